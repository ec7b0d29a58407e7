"""mslsim.build.cached_build: an object is produced once, also when builds of it overlap (pytest's workers ask for
the same test kernels at the same time on a fresh checkout)."""
import threading
import time

from mslsim.build import cached_build


def test_overlapping_builds_of_one_object_produce_it_once(tmp_path):
    calls = []

    def produce(tmp):
        calls.append(threading.get_ident())
        time.sleep(1.0)   # the other build arrives while this one is making the object
        (tmp / "kernel.o").write_bytes(b"object")
        return tmp / "kernel.o"

    results = []
    builds = [threading.Thread(target=lambda: results.append(cached_build("kernel", "k3y", ".o", produce, tmp_path)))
              for _ in range(2)]
    for build in builds:
        build.start()
    for build in builds:
        build.join()
    assert len(calls) == 1, "the second build compiled the object again instead of waiting for the first"
    assert len(results) == 2 and results[0] == results[1] == tmp_path / "kernel-k3y.o"
    assert results[0].read_bytes() == b"object"
