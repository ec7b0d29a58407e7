#pragma once
typedef unsigned long NSUInteger;
#define nil nullptr
@protocol NSObject
- (void)release;
@end
@interface NSObject <NSObject>
+ (instancetype)alloc;
- (instancetype)init;
- (void)release;
@end
@interface NSString : NSObject
+ (NSString*)stringWithUTF8String:(const char*)string;
- (const char*)UTF8String;
@end
@interface NSError : NSObject
- (NSString*)localizedDescription;
@end
