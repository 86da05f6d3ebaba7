#!/bin/sh
# fuzz.sh — drives the sanitizer build (sanitize/ under the build folder) for make's
# check-sanitize and fuzz targets. Owns that folder; never touches the main build.
#
#   fuzz.sh check 'UNIT TESTS'   configure sanitize/ with clang (ASan + UBSan + libFuzzer's
#                                coverage), build the unit tests and the harnesses, and run
#                                `make check` there on the unit tests and fuzz/run-check.
#   fuzz.sh run SECONDS 'NAMES'  the same build, then each harness (NAMES, or every one) for
#                                SECONDS from its committed corpus; new inputs are kept in
#                                sanitize/fuzz/corpus/NAME, findings in sanitize/fuzz/findings/.
#   fuzz.sh merge 'NAMES'        minimise the committed corpus fuzz/corpus/NAME together with
#                                what `run` found (-merge=1), keeping regress-* inputs.
# The environment comes from the make rule: FUZZ_CC, FUZZ_CXX, HAVE_FUZZ, FUZZ_WHY,
# SANITIZE_CFLAGS, SANITIZE_DIR, LATHE_SRCDIR, LATHE_BUILDDIR, FUZZ_NAMES, MAKE.
# Without clang + libFuzzer it prints why and exits 0.
set -eu
mode=$1
src=$LATHE_SRCDIR
dir=$SANITIZE_DIR
MAKE=${MAKE:-make}

if [ "${HAVE_FUZZ:-no}" != yes ]; then
  echo "fuzz: skipped: $FUZZ_WHY (configure's fuzzing line)"
  exit 0
fi

. "$src/fuzz/harnesses.sh"

configure_dir() {
  mkdir -p "$dir/fuzz"
  if [ ! -f "$dir/Makefile" ] || [ "$src/configure" -nt "$dir/Makefile" ]; then
    echo "sanitize: configuring $dir with $FUZZ_CC ($SANITIZE_CFLAGS)"
    (cd "$dir" && "$src/configure" --quiet --without-cuda CC="$FUZZ_CC" CXX="$FUZZ_CXX" \
      CFLAGS="$SANITIZE_CFLAGS" CXXFLAGS="$SANITIZE_CFLAGS" LDFLAGS="$SANITIZE_CFLAGS" \
      FUZZ_CC="$FUZZ_CC" FUZZ_CXX="$FUZZ_CXX" >/dev/null)
  fi
  : >"$dir/fuzz/.sanitize-build"
}

programs() {
  for n in $FUZZ_NAMES; do printf 'fuzz/fuzz_%s ' "$n"; done
}

case $mode in
  check)
    unit=$2
    configure_dir
    echo "sanitize: building the unit tests and the harnesses in $dir"
    $MAKE -C "$dir" --no-print-directory $unit $(programs)
    $MAKE -C "$dir" --no-print-directory check TESTS="$unit fuzz/run-check" check_PROGRAMS="$unit" \
      FUZZ_CHECK_SECONDS="${FUZZ_CHECK_SECONDS:-10}"
    ;;
  run)
    secs=$2
    names=${3:-}
    [ -n "$names" ] || names=$FUZZ_NAMES
    configure_dir
    for n in $names; do $MAKE -C "$dir" --no-print-directory "fuzz/fuzz_$n"; done
    mkdir -p "$dir/fuzz/findings"
    status=0
    for n in $names; do
      work="$dir/fuzz/corpus/$n"
      mkdir -p "$work"
      log="$dir/fuzz/$n.log"
      echo "fuzz: $n for $secs s (log: $log)"
      rc=0
      (cd "$dir/fuzz" && LSAN_OPTIONS="suppressions=$src/fuzz/lsan.supp:print_suppressions=0" \
        nice -n 10 "./fuzz_$n" -max_total_time="$secs" -rss_limit_mb=2048 \
        -max_len="$(max_len "$n")" -timeout=30 -print_final_stats=1 \
        -artifact_prefix="$dir/fuzz/findings/$n-" "$work" "$src/fuzz/corpus/$n" >"$log" 2>&1) || rc=$?
      grep -E '^#[0-9]+.*(DONE|cov:)' "$log" | tail -1 || true
      if [ "$rc" -ne 0 ]; then
        echo "fuzz: $n FOUND SOMETHING (exit $rc):"
        grep -E 'ERROR|SUMMARY|runtime error|Test unit written' "$log" | head -5
        status=1
      fi
    done
    exit $status
    ;;
  merge)
    # Folds what `run` found into the committed corpus: libFuzzer's -merge=1 keeps the smallest
    # inputs that cover every feature of the committed and found inputs; regress-* files (the
    # inputs of fixed bugs) are always kept.
    names=${2:-}
    [ -n "$names" ] || names=$FUZZ_NAMES
    configure_dir
    for n in $names; do
      $MAKE -C "$dir" --no-print-directory "fuzz/fuzz_$n"
      out="$dir/fuzz/merged/$n"
      rm -rf "$out"
      mkdir -p "$out" "$dir/fuzz/corpus/$n"
      (cd "$dir/fuzz" && "./fuzz_$n" -merge=1 -rss_limit_mb=2048 -timeout=30 \
        -max_len="$(max_len "$n")" "$out" "$src/fuzz/corpus/$n" "$dir/fuzz/corpus/$n" \
        >"$dir/fuzz/$n-merge.log" 2>&1)
      find "$src/fuzz/corpus/$n" -type f ! -name 'regress-*' -delete
      for f in "$out"/*; do [ -f "$f" ] && cp "$f" "$src/fuzz/corpus/$n/seed-$(basename "$f" | cut -c1-16)"; done
      echo "fuzz: $n corpus: $(ls "$src/fuzz/corpus/$n" | wc -l) files, $(du -sb "$src/fuzz/corpus/$n" | cut -f1) bytes"
    done
    ;;
  *)
    echo "usage: fuzz.sh check 'UNIT' | run SECONDS 'NAMES' | merge 'NAMES'" >&2
    exit 2
    ;;
esac
