/* bt_ring_exchange: write to one ring, then wait for and read a batch from another, in one call. */
#include "baton.h"
#include "bt_test.h"

int main(void)
{
    bt_ring *out_p, *out_c, *in_p, *in_c;
    CHECK_EQ(bt_ring_create(4096, BT_RING_PRODUCER, 1, &out_p), 0);
    CHECK_EQ(bt_ring_attach(bt_ring_fd(out_p), BT_RING_CONSUMER, &out_c), 0);
    CHECK_EQ(bt_ring_create(4096, BT_RING_PRODUCER, 2, &in_p), 0);
    CHECK_EQ(bt_ring_attach(bt_ring_fd(in_p), BT_RING_CONSUMER, &in_c), 0);
    bt_ring_set_spin(in_c, 0);

    char buf[256];
    uint32_t lens[4];
    bt_ring_batch dst = {.buf = buf, .cap = sizeof buf, .lens = lens, .max_n = 4, .timeout_ns = 1000000};

    /* Nothing comes back: the request is still written, the read side times out. */
    CHECK_EQ(bt_ring_exchange(out_p, "ping", 4, in_c, &dst), -ETIMEDOUT);
    CHECK_EQ(bt_ring_read_batch(out_c, buf, sizeof buf, lens, 4), 1);
    CHECK_EQ(lens[0], 4);
    CHECK(memcmp(buf, "ping", 4) == 0);

    /* An answer already waiting is returned with the batch. */
    CHECK_EQ(bt_ring_write(in_p, "pong", 4), 0);
    CHECK_EQ(bt_ring_write(in_p, "more", 4), 0);
    dst.timeout_ns = UINT64_MAX;
    CHECK_EQ(bt_ring_exchange(out_p, "ping2", 5, in_c, &dst), 2);
    CHECK(lens[0] == 4 && lens[1] == 4 && memcmp(buf, "pongmore", 8) == 0);
    CHECK_EQ(bt_ring_read_batch(out_c, buf, sizeof buf, lens, 4), 1);
    CHECK(lens[0] == 5 && memcmp(buf, "ping2", 5) == 0);

    /* A write that cannot happen reads nothing: the answer stays queued for the next call. */
    CHECK_EQ(bt_ring_write(in_p, "kept", 4), 0);
    static char big[4096];
    dst.timeout_ns = 0;
    CHECK_EQ(bt_ring_exchange(out_p, big, sizeof big, in_c, &dst), -EMSGSIZE);
    while (bt_ring_write(out_p, big, 1000) == 0) {
    }
    CHECK_EQ(bt_ring_exchange(out_p, big, 1000, in_c, &dst), -ENOSPC);
    CHECK_EQ(bt_ring_read_batch(in_c, buf, sizeof buf, lens, 4), 1);
    CHECK(memcmp(buf, "kept", 4) == 0);

    bt_ring_close(out_c);
    bt_ring_close(out_p);
    bt_ring_close(in_c);
    bt_ring_close(in_p);
    puts("test_ring_exchange: ok");
    return 0;
}
