# Shared pieces of the hack/bench-*.sh scripts; source it after `cd` to the
# repository root. It makes a scratch directory $work, removed on exit after
# killing every process whose pid is in $pids, and defines the helpers the
# side-by-side (csi-nbd vs nbdkit) scripts print their tables with.
# python3 runs the arithmetic; set PY first for another interpreter.

work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

median() { ${PY:-python3} -c 'import statistics,sys; m=statistics.median(float(x) for x in sys.argv[1:]); print(int(m) if m == int(m) else round(m, 4))' "$@"; }
ratio() { ${PY:-python3} -c "import sys; a,b=float(sys.argv[1]),float(sys.argv[2]); print(f'{a/b:.2f}x' if b else 'n/a')" "$1" "$2"; }

# table_header WIDTH prints the header of a csi-nbd/nbdkit table whose
# figure column is WIDTH wide; row prints its lines.
table_header() {
  ROW_WIDTH=$1
  printf "%-${ROW_WIDTH}s %12s %12s %8s\n" "figure (median of $ROUNDS)" csi-nbd nbdkit ratio
}
row() { # name csi-values... -- kit-values...
  local name=$1; shift
  local c=() k=() side=c
  for v in "$@"; do
    if [ "$v" = -- ]; then side=k; continue; fi
    if [ $side = c ]; then c+=("$v"); else k+=("$v"); fi
  done
  local cm km
  cm=$(median "${c[@]}"); km=$(median "${k[@]}")
  printf "%-${ROW_WIDTH}s %12s %12s %8s\n" "$name" "$cm" "$km" "$(ratio "$cm" "$km")"
  # ROUND_VALUES=1 adds the figures behind the medians, in round order, so
  # a slow round of one server can be told from a slow host.
  if [ -n "${ROUND_VALUES:-}" ]; then echo "    csi-nbd: ${c[*]}"; echo "    nbdkit:  ${k[*]}"; fi
  # ROUND_RATIOS=1 adds each round's own ratio (csi-nbd and nbdkit of one
  # round were measured back to back), to show the spread behind a median.
  if [ -n "${ROUND_RATIOS:-}" ]; then
    ${PY:-python3} -c 'import sys; n=len(sys.argv)//2; print("    rounds:", " ".join(f"{float(a)/float(b):.2f}" if float(b) else "n/a" for a,b in zip(sys.argv[1:n+1], sys.argv[n+1:])))' "${c[@]}" "${k[@]}"
  fi
}
