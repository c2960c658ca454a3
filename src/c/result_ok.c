/*
 * result_ok.c -- bt_result_ok: does a RESULT payload say {"ok": true}?  The router asks when a parent dispatch
 * with continuations (CTL_CONTINUE, docs/protocol.md "Continuations") reports back, to release or discard them.
 *
 * The bytes come from an agent, so this is a strict, bounded msgpack reader that never reads past p + n.  It
 * decides exactly as the Python router does with msgpack's Unpacker (router/python.py, _result_ok), so both
 * routers agree on every input:
 *
 *   - the payload is exactly one msgpack object (trailing bytes: no) and it is a map (fixmap, map16, map32);
 *   - keys and values may be of any type and are skipped; a key is "ok" when it is a str (fixstr, str8/16/32)
 *     holding the two bytes "ok" (a bin "ok" is not the str "ok" to msgpack either);
 *   - duplicate "ok" keys: the LAST one decides (a Python dict keeps the last value);
 *   - released only when that value is msgpack true (0xc3): 1, "true", false, nil... are not true;
 *   - 0xc1 (never used) is malformed; so is a length or count that runs past the end;
 *   - nesting: inside one key or value at most BT_RESULT_OK_DEPTH containers may be open, counting the one
 *     being started even when it is empty -- the limit of msgpack's C unpacker (MSGPACK_EMBED_STACK_SIZE, 1024,
 *     checked before each container starts); the top-level map is read apart, as Unpacker.read_map_header does.
 *
 * The skip is iterative (a stack of remaining-object counts, 8 KiB), so no input can exhaust the C stack, and a
 * count is checked against the bytes left before anything loops over it (every object takes at least one byte).
 */
#include "router_internal.h"

#define BT_RESULT_OK_DEPTH 1024

static uint64_t be(const uint8_t *p, int bytes)
{
    uint64_t v = 0;
    for (int i = 0; i < bytes; i++)
        v = (v << 8) | p[i];
    return v;
}

/*
 * The header of the object at p[0..left): *hdr = header bytes, *body = bytes of data after them (str/bin/ext),
 * *count = objects that follow as its elements (array n, map 2n).  0 when p[0] is 0xc1 or the header is cut.
 */
static int obj_head(const uint8_t *p, size_t left, size_t *hdr, uint64_t *body, uint64_t *count, int *container)
{
    if (left == 0)
        return 0;
    uint8_t b = p[0];
    size_t h = 1;
    uint64_t data = 0, cnt = 0;
    int cont = 0;
    if (b <= 0x7f || b >= 0xe0 || b == 0xc0 || b == 0xc2 || b == 0xc3) {
        /* positive/negative fixint, nil, false, true */
    } else if (b >= 0x80 && b <= 0x8f) {
        cnt = 2u * (b & 0x0fu);
        cont = 1;
    } else if (b >= 0x90 && b <= 0x9f) {
        cnt = b & 0x0fu;
        cont = 1;
    } else if (b >= 0xa0 && b <= 0xbf) {
        data = b & 0x1fu;
    } else {
        int lb = 0; /* bytes of a length field after the tag */
        switch (b) {
        case 0xc4: case 0xc5: case 0xc6: /* bin 8/16/32 */
        case 0xd9: case 0xda: case 0xdb: /* str 8/16/32 */
            lb = b == 0xc4 || b == 0xd9 ? 1 : b == 0xc5 || b == 0xda ? 2 : 4;
            if (left < 1 + (size_t)lb)
                return 0;
            h = 1 + (size_t)lb;
            data = be(p + 1, lb);
            break;
        case 0xc7: case 0xc8: case 0xc9: /* ext 8/16/32: length, type byte, data */
            lb = b == 0xc7 ? 1 : b == 0xc8 ? 2 : 4;
            if (left < 2 + (size_t)lb)
                return 0;
            h = 2 + (size_t)lb;
            data = be(p + 1, lb);
            break;
        case 0xca: data = 4; break; /* float 32 */
        case 0xcb: data = 8; break; /* float 64 */
        case 0xcc: case 0xd0: data = 1; break; /* uint/int 8 */
        case 0xcd: case 0xd1: data = 2; break;
        case 0xce: case 0xd2: data = 4; break;
        case 0xcf: case 0xd3: data = 8; break;
        case 0xd4: data = 2; break; /* fixext 1, 2, 4, 8, 16: type byte + data */
        case 0xd5: data = 3; break;
        case 0xd6: data = 5; break;
        case 0xd7: data = 9; break;
        case 0xd8: data = 17; break;
        case 0xdc: case 0xdd: /* array 16/32 */
        case 0xde: case 0xdf: /* map 16/32 */
            lb = b == 0xdc || b == 0xde ? 2 : 4;
            if (left < 1 + (size_t)lb)
                return 0;
            h = 1 + (size_t)lb;
            cnt = be(p + 1, lb) * (b >= 0xde ? 2u : 1u);
            cont = 1;
            break;
        default: /* 0xc1: never used */
            return 0;
        }
    }
    if (h > left || data > left - h)
        return 0;
    *hdr = h;
    *body = data;
    *count = cnt;
    *container = cont;
    return 1;
}

/* Skip one whole object at p[*off..n); 0 when it is malformed, cut, or nests too deep. */
static int skip_obj(const uint8_t *p, size_t n, size_t *off)
{
    uint64_t stack[BT_RESULT_OK_DEPTH]; /* objects still to read in each open container */
    int top = 0;
    size_t o = *off;
    for (;;) {
        size_t h;
        uint64_t body, count;
        int cont;
        if (!obj_head(p + o, n - o, &h, &body, &count, &cont))
            return 0;
        o += h + (size_t)body;
        if (cont) {
            if (top >= BT_RESULT_OK_DEPTH)
                return 0;
            if (count > n - o)
                return 0; /* each element takes at least one byte: it cannot be complete */
            if (count) {
                stack[top++] = count;
                continue;
            }
        }
        /* One object done: it completes an element of the innermost open container, maybe several levels. */
        while (top > 0 && --stack[top - 1] == 0)
            top--;
        if (top == 0)
            break;
    }
    *off = o;
    return 1;
}

int bt_result_ok(const uint8_t *p, size_t n)
{
    size_t h, off;
    uint64_t body, count;
    int cont;
    if (!p || !obj_head(p, n, &h, &body, &count, &cont))
        return 0;
    uint8_t b = p[0];
    if (!((b >= 0x80 && b <= 0x8f) || b == 0xde || b == 0xdf))
        return 0; /* not a map */
    off = h;
    if (count > n - off)
        return 0;
    int ok = 0;
    for (uint64_t i = 0; i < count; i += 2) {
        /* The key: is it the str "ok"?  (fixstr a2, or str8/16/32 of length 2) */
        size_t kh, vo;
        uint64_t kbody, kcount;
        int kcont;
        if (!obj_head(p + off, n - off, &kh, &kbody, &kcount, &kcont))
            return 0;
        uint8_t kb = p[off];
        int is_str = (kb >= 0xa0 && kb <= 0xbf) || kb == 0xd9 || kb == 0xda || kb == 0xdb;
        int is_ok = is_str && kbody == 2 && p[off + kh] == 'o' && p[off + kh + 1] == 'k';
        if (!skip_obj(p, n, &off))
            return 0;
        vo = off;
        if (!skip_obj(p, n, &off))
            return 0;
        if (is_ok)
            ok = p[vo] == 0xc3; /* the last "ok" decides */
    }
    return off == n && ok;
}
