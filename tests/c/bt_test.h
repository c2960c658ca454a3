/* Minimal helpers shared by the C test programs: exit 0 pass, 1 fail, 77 skip. */
#ifndef BT_TEST_H
#define BT_TEST_H
#include <stdio.h>
#include <stdlib.h>

#define BT_SKIP 77

/* Fail the program with the source line and the failed expression. */
#define CHECK(expr)                                                                        \
    do {                                                                                   \
        if (!(expr)) {                                                                     \
            fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #expr);      \
            exit(1);                                                                       \
        }                                                                                  \
    } while (0)

/* Compare two integers and print both when they differ. */
#define CHECK_EQ(a, b)                                                                     \
    do {                                                                                   \
        long long va_ = (long long)(a), vb_ = (long long)(b);                              \
        if (va_ != vb_) {                                                                  \
            fprintf(stderr, "%s:%d: CHECK_EQ failed: %s == %lld, %s == %lld\n", __FILE__,  \
                    __LINE__, #a, va_, #b, vb_);                                           \
            exit(1);                                                                       \
        }                                                                                  \
    } while (0)

#endif
