# bench.mk: `make bench-smoke`, the benchmarks of `make bench` with tiny
# counts and one run, so that they run in `make check` and can't rot. It
# checks that every program runs and that the table has every row; it
# asserts nothing about speed.

.PHONY: bench-smoke

bench-smoke: build
	@BENCH_SMOKE=1 BUILD="$(BUILD)" CC="$(CC)" OPT="$(OPT)" WARN="$(WARN)" \
	  LUA_VERSIONS="$(LUA_VERSIONS)" sh bench/run.sh >$(BUILD)/bench-smoke.log 2>&1 || \
	  { cat $(BUILD)/bench-smoke.log; echo "bench-smoke: failed" >&2; exit 1; }
	@echo "bench-smoke: every benchmark ran and reported (table in $(BUILD)/bench-smoke/table.md)"

CHECK_EXTRA += bench-smoke
