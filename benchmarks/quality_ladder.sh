#!/usr/bin/env bash
# The scale ladder of docs/quality.md §10: AdamW, GaLore and PLUMAGE at widths 256 and 384 (4 layers,
# configs/ladder-*.yaml), 600 steps, 3 seeds, both corpora, each arm at its own best matrix LR for the
# width and one shared dense_lr swept per width; then the default's contenders, paired by seed:
# Haar and optimal at width 384 on the embedded corpus, optimal with Σ compact (sigma_rank = r) on
# prose at 384, on both corpora at width 128 (600 steps, 5 seeds) and on prose at 256; then the
# mechanism arms at width 384 (τ, also for optimal; realignment, rank, uniform_mix); τ = 200 at width
# 128, at 600 and at 2400 steps (the horizon); last Haar on prose at 384 and on both corpora at 128.
# Every harness call is resumable (finished runs are reused), so rerunning continues where it stopped.
#
#   bash benchmarks/quality_ladder.sh                 # ~14 h on 2 cores (make quality-ladder)
#   OUT=runs/ladder PYTHON=python3 bash benchmarks/quality_ladder.sh
#
# Width 256: the matrix LRs are swept on seed 0 of the embedded corpus at the config's dense_lr (4e-3),
# then dense_lr ∈ {2, 4, 8}e-3 at each arm's best (grids grow by --extend-grid when the best sits at
# an edge); the prose corpus (manpages) reuses the optima. Width 384: 3-point grids centred on the 256
# optima (matrix and dense), the same procedure. Width 128 (the demo model): docs/quality.md §9's matrix
# LRs (the demo's), then the dense LR swept as at 256, and every seed again at its optimum.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-runs/ladder}"
Q="$PYTHON benchmarks/quality.py --steps 600 --jobs ${JOBS:-2} --nice 19 --estimators adamw,galore,plumage"
stage() { echo "=== $(date +%T) $*"; }
get() {  # get RESULTS.json CORPUS lr ARM | dense
  "$PYTHON" - "$@" <<'PYEOF'
import json, sys
res = json.load(open(sys.argv[1]))["corpora"][sys.argv[2]]
if sys.argv[3] == "lr":
    print(f'{res["arms"][sys.argv[4]]["lr"]:g}')
else:
    print(f'{(res.get("dense_lr") or {}).get("chosen", 0.004):g}')
PYEOF
}
half() { "$PYTHON" -c "print(f'{float(\"$1\") / 2:g}')"; }
dbl() { "$PYTHON" -c "print(f'{float(\"$1\") * 2:g}')"; }

stage "w256 embedded: matrix sweep (seed 0), dense sweep, seeds 0-2"
$Q --config configs/ladder-256.yaml --out "$OUT/w256" --seeds 3 --sweep-seeds 1 \
  --lr-grid adamw=0.0005:0.001:0.002 --lr-grid galore=0.001:0.002:0.004 --lr-grid plumage=0.001:0.002:0.004 \
  --dense-lr-grid 0.002:0.004:0.008 --extend-grid 2 --corpus embedded --report embedded
J="$OUT/w256/results-embedded.json"
A=$(get "$J" embedded lr adamw); G=$(get "$J" embedded lr galore); P=$(get "$J" embedded lr plumage); D=$(get "$J" embedded dense)
echo "w256 optima: adamw $A galore $G plumage $P dense $D"

stage "w256 manpages at the embedded optima"
$Q --config configs/ladder-256.yaml --out "$OUT/w256" --seeds 3 --lr adamw="$A" --lr galore="$G" --lr plumage="$P" \
  --dense-lr-grid "$D" --corpus manpages --report manpages

stage "w384 embedded: grids centred on the 256 optima, base dense = 256's"
$Q --config configs/ladder-384.yaml --out "$OUT/w384" --seeds 3 --sweep-seeds 1 --set optimizer.dense_lr="$D" \
  --lr-grid adamw="$(half "$A"):$A:$(dbl "$A")" --lr-grid galore="$(half "$G"):$G:$(dbl "$G")" \
  --lr-grid plumage="$(half "$P"):$P:$(dbl "$P")" --dense-lr-grid "$(half "$D"):$D:$(dbl "$D")" --extend-grid 2 \
  --corpus embedded --report embedded
J="$OUT/w384/results-embedded.json"
A4=$(get "$J" embedded lr adamw); G4=$(get "$J" embedded lr galore); P4=$(get "$J" embedded lr plumage); D4=$(get "$J" embedded dense)
echo "w384 optima: adamw $A4 galore $G4 plumage $P4 dense $D4"

stage "w384 embedded: the default's contenders, paired by seed (Haar at its own LR; optimal, Σ whole and compact)"
$Q --config configs/ladder-384.yaml --out "$OUT/w384" --seeds 3 --sweep-seeds 1 --set optimizer.dense_lr="$D" \
  --lr adamw="$A4" --lr galore="$G4" --lr plumage="$P4" --dense-lr-grid "$D4" --corpus embedded --report contenders \
  --arm haar=haar --lr-grid haar="$P4:$(dbl "$P4")" --extend-grid 2 \
  --arm optimal-k96=optimal,optimizer.sigma_rank=96 --lr-from optimal-k96=plumage \
  --arm optimal=optimal,optimizer.sigma_rank=0 --lr-from optimal=plumage
H4=$(get "$OUT/w384/results-contenders.json" embedded lr haar)
echo "w384 haar optimum: $H4"

stage "w384 manpages at the embedded optima: the three arms and optimal with Σ compact (sigma_rank = r)"
$Q --config configs/ladder-384.yaml --out "$OUT/w384" --seeds 3 --set optimizer.dense_lr="$D" \
  --lr adamw="$A4" --lr galore="$G4" --lr plumage="$P4" --dense-lr-grid "$D4" --corpus manpages --report manpages \
  --arm optimal-k96=optimal,optimizer.sigma_rank=96 --lr-from optimal-k96=plumage

stage "w128 (configs/demo.yaml) at 600 steps: optimal with sigma_rank = r on both corpora (the three arms on embedded)"
W128="--config configs/demo.yaml --out $OUT/w128 --seeds 5 --sweep-seeds 5 --set optimizer.dense_lr=0.004"
W128="$W128 --lr adamw=0.001 --lr galore=0.002 --lr plumage=0.002 --corpus manpages --corpus embedded"
$Q $W128 --report contenders-k --arm optimal-k32=optimal,optimizer.sigma_rank=32 --lr-from optimal-k32=plumage

stage "w128: the shared dense LR swept on seed 0 of the embedded corpus at the demo's matrix LRs, then every seed there"
$Q --config configs/demo.yaml --out "$OUT/w128" --seeds 1 --sweep-seeds 1 --set optimizer.dense_lr=0.004 \
  --lr adamw=0.001 --lr galore=0.002 --lr plumage=0.002 --dense-lr-grid 0.002:0.004:0.008 --extend-grid 2 \
  --corpus embedded --report dense
D1=$(get "$OUT/w128/results-dense.json" embedded dense)
echo "w128 dense optimum: $D1"
W128="${W128/--set optimizer.dense_lr=0.004/--set optimizer.dense_lr=0.004 --dense-lr-grid $D1}"
$Q $W128 --report d16 --arm optimal-k32=optimal,optimizer.sigma_rank=32 --lr-from optimal-k32=plumage

stage "w256 manpages: optimal with Σ compact (sigma_rank = r) beside Haar at its width-256 optimum (2e-3, §10)"
$Q --config configs/ladder-256.yaml --out "$OUT/w256" --seeds 3 --lr adamw="$A" --lr galore="$G" --lr plumage="$P" \
  --dense-lr-grid "$D" --corpus manpages --report contenders-manpages --arm haar=haar --lr haar=0.002 \
  --arm optimal-k64=optimal,optimizer.sigma_rank=64 --lr-from optimal-k64=plumage

stage "w384 mechanism (embedded, paired by seed; arms in priority order; the contenders' runs are reused)"
$Q --config configs/ladder-384.yaml --out "$OUT/w384" --seeds 3 --set optimizer.dense_lr="$D" \
  --lr adamw="$A4" --lr galore="$G4" --lr plumage="$P4" --dense-lr-grid "$D4" --corpus embedded --report mechanism \
  --arm plumage-tau200=plumage,optimizer.update_interval=200 --lr-from plumage-tau200=plumage \
  --arm galore-tau200=galore,optimizer.update_interval=200 --lr-from galore-tau200=galore \
  --arm optimal-k96-tau200=optimal,optimizer.sigma_rank=96,optimizer.update_interval=200 \
  --lr-from optimal-k96-tau200=plumage \
  --arm plumage-norealign=plumage,optimizer.realign=false --lr-from plumage-norealign=plumage \
  --arm galore-realign=galore,optimizer.realign=true --lr-from galore-realign=galore \
  --arm haar=haar --lr haar="$H4" \
  --arm optimal-k96=optimal,optimizer.sigma_rank=96 --lr-from optimal-k96=plumage \
  --arm optimal=optimal,optimizer.sigma_rank=0 --lr-from optimal=plumage \
  --arm plumage-r8=plumage,optimizer.rank=48 --lr-from plumage-r8=plumage \
  --arm galore-r8=galore,optimizer.rank=48 --lr-from galore-r8=galore \
  --arm plumage-mix0.1=plumage,optimizer.uniform_mix=0.1 --lr-from plumage-mix0.1=plumage

stage "w128 τ = 200 (embedded, 3 seeds, tuned dense LR): does τ cost the small model what it costs at 384? (optimal also
  with Σ weighted toward recent gradients, sigma_weight = 0.5)"
W128E="--config configs/demo.yaml --out $OUT/w128 --seeds 3 --set optimizer.dense_lr=0.004 --dense-lr-grid $D1"
W128E="$W128E --lr adamw=0.001 --lr galore=0.002 --lr plumage=0.002 --corpus embedded"
TAU200="--arm optimal-k32=optimal,optimizer.sigma_rank=32 --lr-from optimal-k32=plumage"
TAU200="$TAU200 --arm plumage-tau200=plumage,optimizer.update_interval=200 --lr-from plumage-tau200=plumage"
TAU200="$TAU200 --arm galore-tau200=galore,optimizer.update_interval=200 --lr-from galore-tau200=galore"
TAU200="$TAU200 --arm optimal-k32-tau200=optimal,optimizer.sigma_rank=32,optimizer.update_interval=200"
TAU200="$TAU200 --lr-from optimal-k32-tau200=plumage"
$Q $W128E --report tau $TAU200 --lr-from optimal-k32-tau200-w0.5=plumage \
  --arm optimal-k32-tau200-w0.5=optimal,optimizer.sigma_rank=32,optimizer.update_interval=200,optimizer.sigma_weight=0.5

stage "w128 at 2400 steps (embedded, seed 0): τ = 200 gets the 12 refreshes τ = 50 gets in 600 steps"
$Q $W128E --steps 2400 --seeds 1 --report horizon $TAU200

stage "w384 manpages: Haar at its embedded optimum beside the rows above"
$Q --config configs/ladder-384.yaml --out "$OUT/w384" --seeds 3 --set optimizer.dense_lr="$D" \
  --lr adamw="$A4" --lr galore="$G4" --lr plumage="$P4" --dense-lr-grid "$D4" --corpus manpages --report manpages \
  --arm haar=haar --lr haar="$H4" --arm optimal-k96=optimal,optimizer.sigma_rank=96 --lr-from optimal-k96=plumage

stage "w128 at 600 steps: every contender on both corpora, paired by seed (Haar swept on all 5 seeds)"
$Q $W128 --report contenders --arm haar=haar --lr-grid haar=0.001:0.002:0.004 --extend-grid 1 \
  --arm optimal-k32=optimal,optimizer.sigma_rank=32 --lr-from optimal-k32=plumage \
  --arm optimal=optimal,optimizer.sigma_rank=0 --lr-from optimal=plumage
stage "done"
