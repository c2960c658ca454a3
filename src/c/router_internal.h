/*
 * router_internal.h -- hooks into the router for the C tests and the fuzz harness.  Not part of the public
 * API: they let a test drive one loop turn at a time and feed bytes as if a client had sent them, without
 * a listening socket or a thread.
 */
#ifndef BATON_ROUTER_INTERNAL_H
#define BATON_ROUTER_INTERNAL_H

#include "baton.h"

/*
 * Adopt an already connected stream socket as a client endpoint with these credentials (not checked):
 * the router owns fd from then on (also on failure, when it is closed).  EP_OPEN is queued for the
 * coordinator.  Returns 0 and the endpoint id in *ep, or -errno.
 */
int bti_router_adopt(bt_router *r, int fd, const bt_peercred *cred, uint64_t *ep);

/*
 * Process len bytes as if they had been read from endpoint ep's socket: frames are decoded and routed
 * exactly like socket input (partial frames wait for more).  -ENOENT when ep is not an open endpoint.
 */
int bti_router_feed(bt_router *r, uint64_t ep, const void *data, size_t len);

/*
 * One loop turn: read the coordinator ring and client rings, poll the I/O engine for up to timeout_ms,
 * read sockets, then flush every connection and publish to the coordinator.  Returns 1 when the router
 * stopped (CTL_SHUTDOWN or the coordinator gone), else 0.
 */
int bti_router_turn(bt_router *r, int timeout_ms);

/* Flush and publish what the current turn queued (the end of a turn, without polling anything). */
void bti_router_end_turn(bt_router *r);

/* Close endpoint ep as if its socket had ended (EP_CLOSED is queued).  -ENOENT when unknown. */
int bti_router_drop(bt_router *r, uint64_t ep);

#endif
