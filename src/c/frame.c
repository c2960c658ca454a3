/*
 * frame.c -- the frame codec (layout and contract in include/baton.h) and bt_version.
 *
 * Every wire field is stored and loaded byte by byte in little-endian order, so the bytes are the same on
 * any host; compilers turn these into plain moves on little-endian machines.  Decoding treats buf as
 * hostile: each length is checked against what the caller actually gave us before anything is read.
 */
#include <limits.h>
#include <stdint.h>
#include <string.h>

#include "baton.h"

/* Wire offsets of the header fields (baton.h, "Frame codec"). */
enum {
    OFF_MAGIC = 0,
    OFF_VERSION = 4,
    OFF_TYPE = 5,
    OFF_PRIORITY = 6,
    OFF_FLAGS = 7,
    OFF_LEN = 8,
    OFF_CRC = 12,
    OFF_SOURCE = 16,
    OFF_DEST = 24,
    OFF_CORR = 32,
    OFF_TS = 40,
};

_Static_assert(BT_FRAME_HEADER_SIZE == OFF_TS + 8, "header fields fill exactly 48 bytes");
_Static_assert((uint64_t)BT_FRAME_HEADER_SIZE + BT_FRAME_MAX_PAYLOAD_LIMIT <= INT_MAX,
               "every frame size must fit the int return value");
_Static_assert(BT_FRAME_MAX_PAYLOAD_DEFAULT <= BT_FRAME_MAX_PAYLOAD_LIMIT, "default within the limit");
_Static_assert(BT_PRIO_COUNT <= 256, "priority is one byte on the wire");

const char *bt_version(void)
{
    return BT_VERSION_STRING;
}

static inline void frame_st32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
    p[2] = (uint8_t)(v >> 16);
    p[3] = (uint8_t)(v >> 24);
}

static inline void frame_st64(uint8_t *p, uint64_t v)
{
    frame_st32(p, (uint32_t)v);
    frame_st32(p + 4, (uint32_t)(v >> 32));
}

static inline uint32_t frame_ld32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static inline uint64_t frame_ld64(const uint8_t *p)
{
    return (uint64_t)frame_ld32(p) | (uint64_t)frame_ld32(p + 4) << 32;
}

/*
 * CRC of a frame laid out contiguously at p (header then payload), with the header's crc32c field counted
 * as zero whatever it holds, so the same function serves encode (field still zero) and decode (field set).
 */
static uint32_t frame_crc(const uint8_t *p, uint32_t payload_len)
{
    static const uint8_t zero[4];
    uint32_t c = bt_crc32c(0, p, OFF_CRC);
    c = bt_crc32c(c, zero, sizeof zero);
    return bt_crc32c(c, p + OFF_CRC + 4, (size_t)(BT_FRAME_HEADER_SIZE - OFF_CRC - 4) + payload_len);
}

int bt_frame_encode(void *buf, size_t cap, const bt_frame_hdr *hdr, const void *payload, size_t len)
{
    if (hdr == NULL || (buf == NULL && cap != 0) || (payload == NULL && len != 0))
        return -EINVAL;
    /* Argument checks before the capacity check: a frame that can never be valid is not "buffer too small". */
    if (len > BT_FRAME_MAX_PAYLOAD_LIMIT)
        return -EMSGSIZE;
    if (hdr->priority >= BT_PRIO_COUNT || (hdr->flags & ~BT_FRAME_F_KNOWN) != 0)
        return -ERANGE;
    if (cap < BT_FRAME_HEADER_SIZE || cap - BT_FRAME_HEADER_SIZE < len)
        return -ENOBUFS;

    uint8_t *p = buf;
    frame_st32(p + OFF_MAGIC, BT_FRAME_MAGIC);
    p[OFF_VERSION] = BT_FRAME_VERSION;
    p[OFF_TYPE] = hdr->type;
    p[OFF_PRIORITY] = hdr->priority;
    p[OFF_FLAGS] = hdr->flags;
    frame_st32(p + OFF_LEN, (uint32_t)len);
    frame_st32(p + OFF_CRC, 0);
    frame_st64(p + OFF_SOURCE, hdr->source);
    frame_st64(p + OFF_DEST, hdr->destination);
    frame_st64(p + OFF_CORR, hdr->correlation_id);
    frame_st64(p + OFF_TS, hdr->send_ts_ns);
    if (len != 0)
        memcpy(p + BT_FRAME_HEADER_SIZE, payload, len);
    if (hdr->flags & BT_FRAME_F_CRC)
        frame_st32(p + OFF_CRC, frame_crc(p, (uint32_t)len));
    return (int)(BT_FRAME_HEADER_SIZE + len);
}

int bt_frame_decode(const void *buf, size_t len, uint32_t max_payload, bt_frame_hdr *out)
{
    const uint8_t *p = buf;
    if (p == NULL && len != 0)
        return -EINVAL;
    /* The order below is part of the contract: only -ENODATA means "more bytes could make this valid". */
    if (len < BT_FRAME_HEADER_SIZE)
        return -ENODATA;
    if (frame_ld32(p + OFF_MAGIC) != BT_FRAME_MAGIC)
        return -EBADMSG;
    if (p[OFF_VERSION] != BT_FRAME_VERSION)
        return -EPROTONOSUPPORT;
    uint8_t flags = p[OFF_FLAGS];
    uint32_t crc = frame_ld32(p + OFF_CRC);
    /*
     * A crc32c field without BT_FRAME_F_CRC must be zero: then decode accepts exactly what encode can
     * produce, and a decoded frame re-encodes to the same bytes (the C/Python twin tests rely on it).
     */
    if (p[OFF_PRIORITY] >= BT_PRIO_COUNT || (flags & ~BT_FRAME_F_KNOWN) != 0 ||
        (!(flags & BT_FRAME_F_CRC) && crc != 0))
        return -ERANGE;
    uint32_t max = max_payload == 0 ? BT_FRAME_MAX_PAYLOAD_DEFAULT
                   : max_payload > BT_FRAME_MAX_PAYLOAD_LIMIT ? BT_FRAME_MAX_PAYLOAD_LIMIT
                                                              : max_payload;
    uint32_t plen = frame_ld32(p + OFF_LEN);
    if (plen > max)
        return -EMSGSIZE;
    /* Subtract on the side known to be >= 48: len + plen could wrap a 32-bit size_t. */
    if (len - BT_FRAME_HEADER_SIZE < plen)
        return -ENODATA;
    if ((flags & BT_FRAME_F_CRC) && frame_crc(p, plen) != crc)
        return -EILSEQ;

    if (out != NULL) {
        out->version = p[OFF_VERSION];
        out->type = p[OFF_TYPE];
        out->priority = p[OFF_PRIORITY];
        out->flags = flags;
        out->payload_len = plen;
        out->crc32c = crc;
        out->_pad = 0;
        out->source = frame_ld64(p + OFF_SOURCE);
        out->destination = frame_ld64(p + OFF_DEST);
        out->correlation_id = frame_ld64(p + OFF_CORR);
        out->send_ts_ns = frame_ld64(p + OFF_TS);
    }
    return (int)(BT_FRAME_HEADER_SIZE + plen);
}
