/*
 * test_result_ok.c -- bt_result_ok, the router's strict msgpack check of a RESULT payload ("ok": true?): every
 * msgpack type as a key and a value, duplicate keys (the last decides), truncation at every length, trailing
 * bytes, 0xc1, counts larger than the input, and the nesting limit (msgpack's own: 1024 open containers inside
 * one key or value).  Every input is checked from an exactly sized heap copy, so ASan sees any over-read.
 */
#include <string.h>

#include "bt_test.h"
#include "router_internal.h"

static int ok_of(const void *p, size_t n)
{
    uint8_t *copy = malloc(n ? n : 1);
    CHECK(copy != NULL);
    memcpy(copy, p, n);
    int rc = bt_result_ok(copy, n);
    free(copy);
    return rc;
}

#define OK(lit) ok_of(lit, sizeof(lit) - 1)

/* Every proper prefix of a valid payload is malformed. */
static void check_prefixes(const char *p, size_t n)
{
    for (size_t k = 0; k < n; k++)
        CHECK_EQ(ok_of(p, k), 0);
}

int main(void)
{
    /* {"ok": true} and friends */
    CHECK_EQ(OK("\x81\xa2ok\xc3"), 1);
    CHECK_EQ(OK("\x81\xa2ok\xc2"), 0);           /* false */
    CHECK_EQ(OK("\x81\xa2ok\x01"), 0);           /* 1 is not true */
    CHECK_EQ(OK("\x81\xa2ok\xc0"), 0);           /* nil */
    CHECK_EQ(OK("\x81\xa2ok\xa4true"), 0);       /* "true" */
    CHECK_EQ(OK("\x80"), 0);                     /* no "ok" */
    CHECK_EQ(OK("\x81\xa2oK\xc3"), 0);           /* another key */
    CHECK_EQ(OK("\x81\xa3okk\xc3"), 0);
    CHECK_EQ(OK("\x81\xc4\x02ok\xc3"), 0);       /* bin "ok" is not the str "ok" */
    CHECK_EQ(OK("\x81\xd9\x02ok\xc3"), 1);       /* str8 "ok" is */
    CHECK_EQ(OK("\x81\xda\x00\x02ok\xc3"), 1);   /* str16 */
    CHECK_EQ(OK("\x81\xdb\x00\x00\x00\x02ok\xc3"), 1); /* str32 */
    CHECK_EQ(OK("\xde\x00\x01\xa2ok\xc3"), 1);   /* map16 */
    CHECK_EQ(OK("\xdf\x00\x00\x00\x01\xa2ok\xc3"), 1); /* map32 */
    /* not a map */
    CHECK_EQ(OK("\x91\xc3"), 0);
    CHECK_EQ(OK("\xc3"), 0);
    CHECK_EQ(OK("\xa2ok"), 0);
    CHECK_EQ(ok_of("", 0), 0);
    CHECK_EQ(bt_result_ok(NULL, 0), 0);
    /* duplicate keys: the last "ok" decides */
    CHECK_EQ(OK("\x82\xa2ok\xc3\xa2ok\xc2"), 0);
    CHECK_EQ(OK("\x82\xa2ok\xc2\xa2ok\xc3"), 1);
    CHECK_EQ(OK("\x83\xa2ok\xc2\xa1x\xc0\xd9\x02ok\xc3"), 1);
    /* trailing bytes, truncation, the unused byte */
    CHECK_EQ(OK("\x81\xa2ok\xc3\xc0"), 0);
    CHECK_EQ(OK("\x81\xa2ok\xc3\x00"), 0);
    check_prefixes("\x81\xa2ok\xc3", 5);
    CHECK_EQ(OK("\x82\xa2ok\xc3\xc1\xc0"), 0);   /* 0xc1 as a key */
    CHECK_EQ(OK("\x82\xa2ok\xc3\xa1x\xc1"), 0);  /* 0xc1 as a value */

    /* Every msgpack type as a key and as a value around {"ok": true}: skipped, the answer stays 1. */
    static const struct {
        const char *p;
        size_t n;
    } objs[] = {
#define O(lit) {lit, sizeof(lit) - 1}
        O("\xc0"), O("\xc2"), O("\xc3"), O("\x00"), O("\x7f"), O("\xe0"), O("\xff"),
        O("\xcc\x01"), O("\xcd\x01\x02"), O("\xce\x01\x02\x03\x04"), O("\xcf\x01\x02\x03\x04\x05\x06\x07\x08"),
        O("\xd0\x80"), O("\xd1\x80\x00"), O("\xd2\x80\x00\x00\x00"), O("\xd3\x80\x00\x00\x00\x00\x00\x00\x00"),
        O("\xca\x3f\x80\x00\x00"), O("\xcb\x3f\xf0\x00\x00\x00\x00\x00\x00"),
        O("\xa0"), O("\xa3" "abc"), O("\xbf" "0123456789012345678901234567890"), O("\xd9\x03xyz"),
        O("\xda\x00\x01z"), O("\xdb\x00\x00\x00\x01z"),
        O("\xc4\x00"), O("\xc4\x02ok"), O("\xc5\x00\x01" "b"), O("\xc6\x00\x00\x00\x01" "b"),
        O("\x90"), O("\x92\x01\xa1x"), O("\xdc\x00\x01\xc0"), O("\xdd\x00\x00\x00\x01\xc0"),
        O("\x80"), O("\x81\xa2ok\xc2"), O("\xde\x00\x01\x01\x02"), O("\xdf\x00\x00\x00\x01\x01\x02"),
        O("\xd4\x01\x02"), O("\xd5\x01\x02\x03"), O("\xd6\xff\x00\x00\x00\x00"), O("\xd7\xff" "01234567"),
        O("\xd8\x05" "0123456789abcdef"), O("\xc7\x00\x05"), O("\xc7\x02\x05xy"), O("\xc8\x00\x01\x05x"),
        O("\xc9\x00\x00\x00\x01\x05x"), O("\xd4\xff\x00"), /* a timestamp ext of a bad length: still skipped */
        O("\x92\x81\xa2ok\xc3\x91\x90"),
#undef O
    };
    for (size_t i = 0; i < sizeof(objs) / sizeof(objs[0]); i++) {
        uint8_t buf[128];
        size_t n = objs[i].n;
        /* {obj: obj, "ok": true} */
        size_t k = 0;
        buf[k++] = 0x82;
        memcpy(buf + k, objs[i].p, n), k += n;
        memcpy(buf + k, objs[i].p, n), k += n;
        memcpy(buf + k, "\xa2ok\xc3", 4), k += 4;
        CHECK_EQ(ok_of(buf, k), 1);
        for (size_t cut = 0; cut < k; cut++)
            CHECK_EQ(ok_of(buf, cut), 0);
        /* {"ok": true, "x": obj} */
        k = 0;
        memcpy(buf, "\x82\xa2ok\xc3\xa1x", 7), k = 7;
        memcpy(buf + k, objs[i].p, n), k += n;
        CHECK_EQ(ok_of(buf, k), 1);
        /* {"ok": obj}: true only for true itself */
        memcpy(buf, "\x81\xa2ok", 4), k = 4;
        memcpy(buf + k, objs[i].p, n), k += n;
        CHECK_EQ(ok_of(buf, k), objs[i].p[0] == '\xc3' && n == 1);
    }

    /* Counts and lengths far beyond the input: malformed, at once (no loop over the count). */
    CHECK_EQ(OK("\xdf\xff\xff\xff\xff\xa2ok\xc3"), 0);
    CHECK_EQ(OK("\x82\xa2ok\xc3\xa1x\xdd\xff\xff\xff\xff"), 0);
    CHECK_EQ(OK("\x82\xa2ok\xc3\xa1x\xdf\xff\xff\xff\xff"), 0);
    CHECK_EQ(OK("\x82\xa2ok\xc3\xa1x\xdb\xff\xff\xff\xff"), 0);
    CHECK_EQ(OK("\x82\xa2ok\xc3\xa1x\xc6\xff\xff\xff\xff"), 0);
    CHECK_EQ(OK("\x82\xa2ok\xc3\xa1x\xc9\xff\xff\xff\xff\x01"), 0);

    /* Nesting: {"x": [[...[nil]...]], "ok": true} with d arrays; msgpack refuses a 1025th open container. */
    {
        size_t cap = 2100;
        uint8_t *buf = malloc(cap);
        CHECK(buf != NULL);
        for (int d = 1020; d <= 1030; d++) {
            size_t k = 0;
            buf[k++] = 0x82;
            buf[k++] = 0xa1;
            buf[k++] = 'x';
            for (int i = 0; i < d; i++)
                buf[k++] = 0x91;
            buf[k++] = 0xc0;
            memcpy(buf + k, "\xa2ok\xc3", 4), k += 4;
            CHECK_EQ(ok_of(buf, k), d <= 1024);
            /* the innermost container empty: it counts too */
            buf[3 + d - 1] = 0x90;
            memmove(buf + 3 + d, buf + 3 + d + 1, k - (3 + d + 1));
            CHECK_EQ(ok_of(buf, k - 1), d <= 1024);
            /* maps as values: {"x": {nil: {nil: ... nil}}} */
            k = 3;
            for (int i = 0; i < d; i++)
                buf[k++] = 0x81, buf[k++] = 0xc0;
            buf[k++] = 0xc0;
            memcpy(buf + k, "\xa2ok\xc3", 4), k += 4;
            CHECK_EQ(ok_of(buf, k), d <= 1024);
        }
        /* Very deep nesting (far beyond the limit) never recurses: refused. */
        size_t k = 0;
        buf[k++] = 0x81;
        buf[k++] = 0xa2, buf[k++] = 'o', buf[k++] = 'k';
        while (k < cap)
            buf[k++] = 0x91;
        CHECK_EQ(ok_of(buf, k), 0);
        free(buf);
    }
    puts("test_result_ok: ok");
    return 0;
}
