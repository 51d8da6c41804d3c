#!/usr/bin/env bash
# What one system call's entry and exit cost on this kernel: 5 million
# getppid(2) calls, which do nothing else, timed in a loop; median of 5.
# This is the most io_uring's batching could save per call it replaces
# (docs/benchmarks.md, "Where the CPU per connection goes").
#
#   benches/syscall-cost.sh
set -euo pipefail
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
cat > "$work/nullsys.c" <<'C'
#include <stdio.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
int main(void) {
  struct timespec a, b;
  const long n = 5000000;
  clock_gettime(CLOCK_MONOTONIC, &a);
  for (long i = 0; i < n; i++) syscall(SYS_getppid);
  clock_gettime(CLOCK_MONOTONIC, &b);
  printf("%.1f\n", ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / n);
  return 0;
}
C
cc -O2 -o "$work/nullsys" "$work/nullsys.c"
for _ in 1 2 3 4 5; do "$work/nullsys"; done | sort -n | sed -n 3p | sed 's/$/ ns per system call (median of 5)/'
