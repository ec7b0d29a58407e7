"""mslsim.build.cached_build: an object is produced once, also when builds of it overlap (pytest's workers ask for
the same test kernels at the same time on a fresh checkout)."""
import threading
import time

from mslsim.build import cached_build


def test_overlapping_builds_of_one_object_produce_it_once(tmp_path):
    calls, started, produced = [], [], []

    def produce(tmp):
        calls.append(threading.get_ident())
        time.sleep(1.0)   # the other build arrives while this one is making the object
        (tmp / "kernel.o").write_bytes(b"object")
        produced.append(time.monotonic())
        return tmp / "kernel.o"

    results = []

    def build():
        started.append(time.monotonic())
        results.append(cached_build("kernel", "k3y", ".o", produce, tmp_path))

    builds = [threading.Thread(target=build) for _ in range(2)]
    for b in builds:
        b.start()
    for b in builds:
        b.join()
    assert len(started) == 2 and max(started) < produced[0], "the builds did not overlap: nothing was tested"
    assert len(calls) == 1, "the second build compiled the object again instead of waiting for the first"
    assert len(results) == 2 and results[0] == results[1] == tmp_path / "kernel-k3y.o"
    assert results[0].read_bytes() == b"object"
