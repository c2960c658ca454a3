/*
 * fuzz_frame.c -- libFuzzer harness for the frame decoder (and the CRC32C paths behind it).
 *
 * For arbitrary bytes, under several payload maxima: decode never reads outside the input (ASan sees an
 * exactly sized heap copy), returns only documented errors, and whatever it accepts re-encodes to exactly
 * the bytes it accepted.  Hardware and table CRC must agree on the input as well.
 */
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "baton.h"

uint32_t bti_crc32c_sw(uint32_t crc, const void *data, size_t len);
uint32_t bti_crc32c_hw(uint32_t crc, const void *data, size_t len);

static int documented(int rc)
{
    return rc == -ENODATA || rc == -EBADMSG || rc == -EPROTONOSUPPORT || rc == -ERANGE || rc == -EMSGSIZE ||
           rc == -EILSEQ;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    /* libFuzzer's buffer may have slack after it; a copy of exactly size bytes makes over-reads visible. */
    uint8_t *in = malloc(size ? size : 1);
    if (in == NULL)
        return 0;
    if (size)
        memcpy(in, data, size);

    if (bti_crc32c_hw(0, in, size) != bti_crc32c_sw(0, in, size))
        abort();

    const uint32_t maxima[] = {0, 1, 64, 4096, BT_FRAME_MAX_PAYLOAD_LIMIT, UINT32_MAX};
    int first_ok = 0;
    for (size_t m = 0; m < sizeof maxima / sizeof maxima[0]; m++) {
        bt_frame_hdr h;
        int rc = bt_frame_decode(size ? in : NULL, size, maxima[m], &h);
        if (rc < 0) {
            if (!documented(rc))
                abort();
            continue;
        }
        if ((size_t)rc > size || rc < BT_FRAME_HEADER_SIZE || (size_t)rc != BT_FRAME_HEADER_SIZE + h.payload_len)
            abort();
        /* Acceptance does not depend on the maximum beyond the length check: same size every time. */
        if (first_ok && rc != first_ok)
            abort();
        first_ok = rc;
        if (h.version != BT_FRAME_VERSION || h.priority >= BT_PRIO_COUNT || (h.flags & ~BT_FRAME_F_KNOWN))
            abort();

        uint8_t *out = malloc((size_t)rc);
        if (out == NULL)
            break;
        int n = bt_frame_encode(out, (size_t)rc, &h, in + BT_FRAME_HEADER_SIZE, h.payload_len);
        if (n != rc || memcmp(out, in, (size_t)rc) != 0)
            abort();
        /* One byte short of the frame is "need more", never an error or a success. */
        if (bt_frame_decode(in, (size_t)rc - 1, maxima[m], NULL) != -ENODATA)
            abort();
        free(out);
    }
    free(in);
    return 0;
}
