# C-side builds that pip does not do: the standalone C test programs (plain and ASan+UBSan), the libFuzzer
# harnesses and the C benchmarks.  The Python extension itself is built by `pip install .` (cffi).
#
#   make check-c        build and run tests/c/test_*.c            (exit 0 pass, 1 fail, 77 skip)
#   make check-c-asan   the same programs under -fsanitize=address,undefined
#   make fuzz FUZZ_SECONDS=30   run every tests/fuzz/fuzz_*.c harness for a bounded time (needs clang)
#   make bench-c        build bench/c/*.c

CC ?= cc
CLANG ?= clang
OUT := build/c
LIB_SRC := $(wildcard src/c/*.c)
LIB_HDR := include/baton.h $(wildcard src/c/*.h)
TEST_SRC := $(wildcard tests/c/test_*.c)
FUZZ_SRC := $(wildcard tests/fuzz/fuzz_*.c)
BENCH_SRC := $(wildcard bench/c/*.c)
FUZZ_SECONDS ?= 20

HAVE_URING := $(shell test -f /usr/include/liburing.h && test "$$BATON_NO_URING" != 1 && echo 1)
DEFS := -D_GNU_SOURCE $(if $(HAVE_URING),-DBT_HAVE_LIBURING)
LIBS := $(if $(HAVE_URING),-luring) -lpthread
WARN := -Wall -Wextra -Werror
BASE := -std=gnu11 -Iinclude -Isrc/c -Itests/c $(DEFS) $(WARN) -g

REL_CFLAGS := $(BASE) -O2
SAN_CFLAGS := $(BASE) -O1 -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=undefined

TESTS := $(patsubst tests/c/%.c,%,$(TEST_SRC))
REL_BINS := $(addprefix $(OUT)/release/,$(TESTS))
SAN_BINS := $(addprefix $(OUT)/asan/,$(TESTS))
FUZZ_BINS := $(patsubst tests/fuzz/%.c,$(OUT)/fuzz/%,$(FUZZ_SRC))
BENCH_BINS := $(patsubst bench/c/%.c,$(OUT)/bench/%,$(BENCH_SRC))

.PHONY: all tests-c check-c check-c-asan fuzz fuzz-build bench-c clean
all: tests-c

tests-c: $(REL_BINS)

$(OUT)/release/%: tests/c/%.c $(LIB_SRC) $(LIB_HDR) $(wildcard tests/c/*.h)
	@mkdir -p $(dir $@)
	$(CC) $(REL_CFLAGS) -o $@ $< $(LIB_SRC) $(LIBS)

$(OUT)/asan/%: tests/c/%.c $(LIB_SRC) $(LIB_HDR) $(wildcard tests/c/*.h)
	@mkdir -p $(dir $@)
	$(CC) $(SAN_CFLAGS) -o $@ $< $(LIB_SRC) $(LIBS)

$(OUT)/fuzz/%: tests/fuzz/%.c $(LIB_SRC) $(LIB_HDR)
	@mkdir -p $(dir $@)
	$(CLANG) $(BASE) -O1 -fsanitize=fuzzer,address,undefined -o $@ $< $(LIB_SRC) $(LIBS)

$(OUT)/bench/%: bench/c/%.c $(LIB_SRC) $(LIB_HDR) $(wildcard bench/c/*.h)
	@mkdir -p $(dir $@)
	$(CC) $(BASE) -O2 -march=native -o $@ $< $(LIB_SRC) $(LIBS)

check-c: $(REL_BINS)
	@tests/c/run_all.sh $(REL_BINS)

check-c-asan: $(SAN_BINS)
	@ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
		tests/c/run_all.sh $(SAN_BINS)

fuzz-build: $(FUZZ_BINS)

fuzz: $(FUZZ_BINS)
	@set -e; for f in $(FUZZ_BINS); do \
		name=$$(basename $$f); mkdir -p $(OUT)/fuzz/corpus-$$name; \
		echo "fuzz: $$name for $(FUZZ_SECONDS)s"; \
		$$f -max_total_time=$(FUZZ_SECONDS) -print_final_stats=0 $(OUT)/fuzz/corpus-$$name tests/fuzz/seeds/$$name 2>&1 | tail -n 3; \
	done

bench-c: $(BENCH_BINS)

clean:
	rm -rf $(OUT)
