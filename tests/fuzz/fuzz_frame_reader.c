/*
 * fuzz_frame_reader.c -- libFuzzer harness for the stream frame reader.
 *
 * Input: two control bytes, then the stream.  The control bytes pick max_payload (64, or 3000 so the buffer
 * must grow) and seed the chunk sizes the stream is fed in (1..150 bytes: below and above the small cap) and
 * how frames are taken out (next() or drain() with a small batch and a buffer that is sometimes too small).  Checked for every input:
 *   - frames come out in order, each equal to the next bytes of the stream, each a valid frame;
 *   - the reader never holds more than 48 + max_payload bytes (by the bytes it accepted and by its heap);
 *   - after taking every complete frame out, one more byte always fits (no wedged stream);
 *   - a stream error is a documented decode error and sticks to every later call.
 */
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "baton.h"

/* Two limits: one below the reader's initial buffer, one that makes it grow. */
static uint32_t MAXP;
#define CAP ((size_t)BT_FRAME_HEADER_SIZE + MAXP)
#define CAP_MAX (BT_FRAME_HEADER_SIZE + 3000)

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
size_t __sanitizer_get_current_allocated_bytes(void); /* sanitizer runtime */

static int documented(int rc)
{
    return rc == -EBADMSG || rc == -EPROTONOSUPPORT || rc == -ERANGE || rc == -EMSGSIZE || rc == -EILSEQ;
}

static uint32_t rng_next(uint32_t *s)
{
    uint32_t x = *s;
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    return *s = x;
}

/* One frame handed over at stream offset *consumed: check it and step past it. */
static void check_frame(const uint8_t *stream, size_t len, size_t *consumed, const void *frame, size_t flen)
{
    if (flen < BT_FRAME_HEADER_SIZE || flen > CAP || *consumed + flen > len)
        abort();
    if (memcmp(frame, stream + *consumed, flen) != 0)
        abort();
    bt_frame_hdr h;
    if (bt_frame_decode(frame, flen, MAXP, &h) != (int)flen)
        abort();
    *consumed += flen;
}

/* Take complete frames out: returns how many, or the stream error. */
static int take(bt_frame_reader *rd, const uint8_t *stream, size_t len, size_t *consumed, uint32_t *rng)
{
    uint32_t r = rng_next(rng);
    if (r & 1) {
        bt_frame_hdr h;
        const void *p;
        int n = 0, rc;
        while ((rc = bt_frame_reader_next(rd, &h, &p)) == 1) {
            size_t flen = BT_FRAME_HEADER_SIZE + (size_t)h.payload_len;
            check_frame(stream, len, consumed, (const uint8_t *)p - BT_FRAME_HEADER_SIZE, flen);
            n++;
        }
        return rc < 0 ? rc : n;
    }
    uint8_t out[3 * CAP_MAX];
    uint32_t lens[4];
    size_t cap = (r >> 1) % (3 * CAP) + 1; /* sometimes too small for the next frame */
    int max_n = (int)((r >> 12) % 4) + 1;
    int total = 0;
    for (;;) {
        int n = bt_frame_reader_drain(rd, out, cap, lens, max_n);
        if (n == -ENOBUFS) {
            cap = sizeof(out); /* not sticky: a big enough buffer takes it */
            continue;
        }
        if (n <= 0)
            return n < 0 ? n : total;
        size_t off = 0;
        for (int i = 0; i < n; i++) {
            check_frame(stream, len, consumed, out + off, lens[i]);
            off += lens[i];
        }
        if (off > cap)
            abort();
        total += n;
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 2)
        return 0;
    uint32_t rng = (uint32_t)data[0] | (uint32_t)data[1] << 8 | 0x9e370000u;
    MAXP = (data[1] & 0x80) ? 3000 : 64;
    const uint8_t *stream = data + 2;
    size_t len = size - 2;

    size_t heap0 = __sanitizer_get_current_allocated_bytes();
    bt_frame_reader *rd;
    if (bt_frame_reader_open(MAXP, &rd) != 0)
        abort();
    size_t fed = 0, consumed = 0;
    int err = 0;
    size_t limit = 150;
    while (fed < len && !err) {
        size_t chunk = rng_next(&rng) % limit + 1;
        if (chunk > len - fed)
            chunk = len - fed;
        int rc = bt_frame_reader_feed(rd, stream + fed, chunk);
        if (rc == (int)chunk) {
            fed += chunk;
            limit = 150;
        } else if (rc == -ENOBUFS) {
            if (fed - consumed + chunk <= CAP)
                abort(); /* refused although it fitted */
            int n = take(rd, stream, len, &consumed, &rng);
            if (n < 0) {
                err = n;
            } else if (n == 0) {
                if (chunk == 1)
                    abort(); /* nothing complete, yet not even one byte fits: wedged */
                limit = chunk / 2;
            }
        } else if (rc < 0 && documented(rc)) {
            err = rc; /* the error surfaced on an earlier call; feed repeats it */
        } else {
            abort();
        }
        if (fed - consumed > CAP)
            abort();
        /* The buffer never grows past the cap (plus the handle and allocator rounding). */
        if (__sanitizer_get_current_allocated_bytes() - heap0 > CAP + 256)
            abort();
        if (!err && (rng_next(&rng) & 3) == 0) {
            int n = take(rd, stream, len, &consumed, &rng);
            if (n < 0)
                err = n;
        }
    }
    if (!err) {
        int n = take(rd, stream, len, &consumed, &rng);
        if (n < 0)
            err = n;
    }
    if (err) {
        if (!documented(err))
            abort();
        /* Sticky: every call reports it again. */
        bt_frame_hdr h;
        const void *p;
        uint8_t out[CAP_MAX];
        uint32_t lens[2];
        if (bt_frame_reader_next(rd, &h, &p) != err || bt_frame_reader_drain(rd, out, sizeof(out), lens, 2) != err ||
            bt_frame_reader_feed(rd, "B", 1) != err)
            abort();
        /* The error is about the bytes at the consumed offset. */
        if (consumed >= len)
            abort();
    } else if (consumed < len) {
        /* What is left is an incomplete frame: the decoder must agree it needs more. */
        bt_frame_hdr h;
        if (bt_frame_decode(stream + consumed, len - consumed, MAXP, &h) != -ENODATA)
            abort();
    }
    bt_frame_reader_close(rd);
    return 0;
}
