/*
 * frame_reader.c -- turn a byte stream into validated frames with bounded memory.
 *
 * Unconsumed bytes live in buf[rpos..wpos).  The buffer starts small, grows geometrically when a frame or a
 * read needs more room, and never beyond cap = BT_FRAME_HEADER_SIZE + max_payload: bt_frame_decode rejects a
 * payload length above max_payload as soon as the 48 header bytes are here, so a complete legal frame always
 * fits and a hostile length can never make us allocate.  Consumed bytes are reclaimed by moving the
 * unconsumed tail to the front (cheap: it is at most one partial frame once the caller has taken the
 * complete ones out).
 */
#include "baton.h"

#include <stdlib.h>
#include <unistd.h>

/* First allocation: small, because thousands of agents may sit idle; a busy stream grows it (see fill). */
#define FRAME_READER_INITIAL 1024u

struct bt_frame_reader {
    uint8_t *buf;
    size_t size; /* allocated bytes, <= cap */
    size_t cap;  /* BT_FRAME_HEADER_SIZE + max_payload */
    size_t rpos; /* first unconsumed byte */
    size_t wpos; /* one past the last buffered byte */
    uint32_t max_payload;
    int err;       /* sticky stream error (negative) or 0 */
    int read_full; /* the last fill's read() took all the room offered: the stream outpaces the buffer */
};

int bt_frame_reader_open(uint32_t max_payload, bt_frame_reader **out)
{
    if (!out)
        return -EINVAL;
    if (max_payload == 0)
        max_payload = BT_FRAME_MAX_PAYLOAD_DEFAULT;
    if (max_payload > BT_FRAME_MAX_PAYLOAD_LIMIT)
        max_payload = BT_FRAME_MAX_PAYLOAD_LIMIT;
    bt_frame_reader *rd = calloc(1, sizeof(*rd));
    if (!rd)
        return -ENOMEM;
    rd->max_payload = max_payload;
    rd->cap = (size_t)BT_FRAME_HEADER_SIZE + max_payload;
    rd->size = rd->cap < FRAME_READER_INITIAL ? rd->cap : FRAME_READER_INITIAL;
    rd->buf = malloc(rd->size);
    if (!rd->buf) {
        free(rd);
        return -ENOMEM;
    }
    *out = rd;
    return 0;
}

void bt_frame_reader_close(bt_frame_reader *rd)
{
    if (!rd)
        return;
    free(rd->buf);
    free(rd);
}

/* Bytes the frame at rpos needs in total when its header is buffered (0 when it is not yet), so the buffer
 * can be grown once to the right size instead of doubling towards it. */
static size_t frame_reader_pending_size(const bt_frame_reader *rd)
{
    if (rd->wpos - rd->rpos < BT_FRAME_HEADER_SIZE)
        return 0;
    const uint8_t *p = rd->buf + rd->rpos + 8;
    uint32_t plen = (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
    if (plen > rd->max_payload)
        return 0; /* next() reports it; never size the buffer from a hostile length */
    return (size_t)BT_FRAME_HEADER_SIZE + plen;
}

/*
 * Make at least `want` free bytes available after wpos (want <= cap - buffered, checked by the callers):
 * reset or compact first, then grow geometrically up to cap.
 */
static int frame_reader_reserve(bt_frame_reader *rd, size_t want)
{
    size_t used = rd->wpos - rd->rpos;
    if (used == 0) {
        rd->rpos = rd->wpos = 0;
    } else if (rd->rpos && rd->size - rd->wpos < want) {
        memmove(rd->buf, rd->buf + rd->rpos, used);
        rd->rpos = 0;
        rd->wpos = used;
    }
    if (rd->size - rd->wpos >= want)
        return 0;
    size_t need = rd->wpos + want;
    size_t size = rd->size;
    while (size < need)
        size = size > rd->cap / 2 ? rd->cap : size * 2;
    uint8_t *nb = realloc(rd->buf, size);
    if (!nb)
        return -ENOMEM;
    rd->buf = nb;
    rd->size = size;
    return 0;
}

int bt_frame_reader_fill(bt_frame_reader *rd, int fd)
{
    if (!rd)
        return -EINVAL;
    if (rd->err)
        return rd->err;
    size_t used = rd->wpos - rd->rpos;
    if (used >= rd->cap)
        return -ENOBUFS; /* holds a complete maximal frame: the caller must take it out first */
    /* Read at least what completes the pending frame, and otherwise whatever room there is -- but never
     * less than a quarter of the buffer, so small reads do not degenerate into one syscall per frame. */
    size_t want = 1;
    size_t pending = frame_reader_pending_size(rd);
    if (pending > used)
        want = pending - used;
    size_t quarter = rd->size / 4;
    if (want < quarter)
        want = quarter;
    /* The last read filled the buffer: ask for a whole buffer's worth, which doubles it (up to the cap),
     * so a busy stream is read in few syscalls while an idle one keeps its small buffer. */
    if (rd->read_full && want < rd->size)
        want = rd->size;
    if (want > rd->cap - used)
        want = rd->cap - used;
    int rc = frame_reader_reserve(rd, want);
    if (rc < 0)
        return rc;
    size_t room = rd->size - rd->wpos;
    if (room > INT32_MAX)
        room = INT32_MAX;
    for (;;) {
        ssize_t n = read(fd, rd->buf + rd->wpos, room);
        if (n > 0) {
            rd->wpos += (size_t)n;
            rd->read_full = (size_t)n == room;
            return (int)n;
        }
        if (n == 0)
            return -EPIPE;
        if (errno == EWOULDBLOCK)
            return -EAGAIN;
        if (errno != EINTR)
            return -errno;
    }
}

int bt_frame_reader_feed(bt_frame_reader *rd, const void *data, size_t len)
{
    if (!rd || (len && !data) || len > INT32_MAX)
        return -EINVAL;
    if (rd->err)
        return rd->err;
    if (len > rd->cap - (rd->wpos - rd->rpos))
        return -ENOBUFS;
    if (len == 0)
        return 0;
    int rc = frame_reader_reserve(rd, len);
    if (rc < 0)
        return rc;
    memcpy(rd->buf + rd->wpos, data, len);
    rd->wpos += len;
    return (int)len;
}

/* Decode the frame at rpos (hdr may be NULL): its size, 0 when incomplete, or the (now sticky) stream
 * error. */
static int frame_reader_peek(bt_frame_reader *rd, bt_frame_hdr *hdr)
{
    if (rd->err)
        return rd->err;
    size_t used = rd->wpos - rd->rpos;
    if (used == 0)
        return 0;
    /* Fail on a bad magic as soon as its first byte is here rather than after 48 bytes of garbage.  Once a
     * whole header is here bt_frame_decode checks the magic first, so this only looks at a partial one. */
    if (used < BT_FRAME_HEADER_SIZE) {
        const uint8_t *p = rd->buf + rd->rpos;
        for (size_t i = 0; i < used && i < 4; i++)
            if (p[i] != (uint8_t)(BT_FRAME_MAGIC >> (8 * i)))
                return rd->err = -EBADMSG;
        return 0;
    }
    int rc = bt_frame_decode(rd->buf + rd->rpos, used, rd->max_payload, hdr);
    if (rc == -ENODATA)
        return 0;
    if (rc < 0)
        return rd->err = rc;
    return rc;
}

int bt_frame_reader_next(bt_frame_reader *rd, bt_frame_hdr *hdr, const void **payload)
{
    if (!rd || !hdr || !payload)
        return -EINVAL;
    int rc = frame_reader_peek(rd, hdr);
    if (rc <= 0)
        return rc;
    *payload = rd->buf + rd->rpos + BT_FRAME_HEADER_SIZE;
    rd->rpos += (size_t)rc;
    return 1;
}

int bt_frame_reader_drain(bt_frame_reader *rd, void *buf, size_t cap, uint32_t *lens, int max_n)
{
    if (!rd || max_n < 0 || (max_n && (!buf || !lens)))
        return -EINVAL;
    uint8_t *out = buf;
    size_t off = 0;
    int n = 0;
    while (n < max_n) {
        int rc = frame_reader_peek(rd, NULL); /* sizes only: the header goes out as raw bytes */
        if (rc < 0)
            return n ? n : rc; /* sticky: the caller sees it on the next call */
        if (rc == 0)
            break;
        if ((size_t)rc > cap - off) {
            if (n == 0)
                return -ENOBUFS; /* the frame stays buffered; retry with a bigger buffer */
            break;
        }
        memcpy(out + off, rd->buf + rd->rpos, (size_t)rc);
        off += (size_t)rc;
        lens[n++] = (uint32_t)rc;
        rd->rpos += (size_t)rc;
    }
    return n;
}
