/*
 * fuzz_result_ok.c -- libFuzzer harness for bt_result_ok, the router's strict msgpack check of a RESULT payload
 * (src/c/result_ok.c): the bytes come from agents, so it must hold for anything.
 *
 * For arbitrary bytes, read from an exactly sized heap copy (ASan sees any over-read): the answer is 0 or 1;
 * a 1 means the input starts with a map header; and since msgpack is prefix-free, a 1 is never given to the
 * same bytes cut by one (a whole object's proper prefix is not a whole object) nor with one byte appended.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "router_internal.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    uint8_t *in = malloc(size + 1);
    if (!in)
        return 0;
    if (size)
        memcpy(in, data, size);
    int ok = bt_result_ok(in, size);
    if (ok != 0 && ok != 1)
        abort();
    if (ok) {
        uint8_t b = in[0];
        if (!((b >= 0x80 && b <= 0x8f) || b == 0xde || b == 0xdf))
            abort();
        if (bt_result_ok(in, size - 1))
            abort();
        in[size] = 0xc0;
        if (bt_result_ok(in, size + 1))
            abort();
    }
    free(in);
    return 0;
}
