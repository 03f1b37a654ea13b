#!/usr/bin/env bash
# Fetch, import or generate the data the tutorial runs on. Run with --help for the details.
# Never deletes user data; a failed or interrupted step leaves no half-made dataset in place.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DATA_DIR="${TRM_DATA_DIR:-$REPO/data}"
MSD_URL="${TRM_MSD_URL:-https://msd-for-monai.s3-us-west-2.amazonaws.com/Task01_BrainTumour.tar}"
MSD_MD5="${TRM_MSD_MD5:-240a19d752f0d9e9101544901065d872}"
RETRIES="${TRM_DOWNLOAD_RETRIES:-5}"
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"
elif [ -x "$REPO/.venv/bin/python" ]; then PY="$REPO/.venv/bin/python"
else PY="python3"; fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

usage() {
  cat <<EOF
usage: ./data_download.sh COMMAND [--dest DIR] [--from PATH]

Commands
  phantom              generate the embedded brain phantom (iSeg-2019-like and FeTS-2021-like sets,
                       in the real layouts) under DIR/phantom; reused when already there
  msd                  download MSD Task01_BrainTumour (~7.6 GB, CC-BY-SA 4.0) with resume and
                       retries, verify its MD5, extract to DIR/Task01_BrainTumour
  iseg2019 --from PATH import the iSeg-2019 training data you downloaded after registering
                       (a .zip/.tar(.gz) archive or a folder) to DIR/iSeg-2019-Training
  fets2021 --from PATH import the FeTS 2021 training data (archive or folder) to
                       DIR/MICCAI_FeTS2021_TrainingData
  verify NAME          check the layout of NAME (iseg2019, fets2021, msd) under DIR

Options
  --dest DIR   data directory (default: \$TRM_DATA_DIR, else <repo>/data; now: $DATA_DIR)
  --from PATH  archive or folder to import (iseg2019, fets2021)

A dataset already present and verified is kept and reported, never re-downloaded or
overwritten. Environment: TRM_DATA_DIR, TRM_MSD_URL, TRM_MSD_MD5, TRM_DOWNLOAD_RETRIES, PYTHON.
EOF
}

die() { echo "error: $*" >&2; exit 1; }
verify() { "$PY" -m trm_utils.data verify "$1" "$2"; }

CMD="${1:-}"
[ -n "$CMD" ] || { usage; exit 2; }
shift
FROM=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dest) [ $# -ge 2 ] || die "--dest needs a directory"; DATA_DIR="$2"; shift 2 ;;
    --from) [ $# -ge 2 ] || die "--from needs an archive or folder"; FROM="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) if [ "$CMD" = verify ] && [ -z "${NAME:-}" ]; then NAME="$1"; shift; else die "unknown argument '$1' (see --help)"; fi ;;
  esac
done

TMP=""
cleanup() { if [ -n "$TMP" ] && [ -d "$TMP" ]; then rm -rf "$TMP"; fi; }
trap cleanup EXIT

# keep an existing, verified dataset; refuse to touch one that fails verification
keep_existing() {  # name folder
  if [ -e "$2" ]; then
    if msg=$(verify "$1" "$2" 2>&1); then
      echo "kept: $msg"; exit 0
    fi
    die "$2 exists but does not verify (${msg#error: }); it was left untouched: move it aside and run again"
  fi
}

# extract an archive or copy a folder into $TMP/in, then print the folder holding the dataset
stage() {  # source find-args...
  local src="$1"; shift
  mkdir -p "$TMP/in"
  if [ -d "$src" ]; then cp -R "$src/." "$TMP/in/"
  elif [ -f "$src" ]; then
    case "$src" in
      *.zip) "$PY" -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])" "$src" "$TMP/in" ;;
      *.tar|*.tar.gz|*.tgz|*.tar.bz2|*.tar.xz) tar -xf "$src" -C "$TMP/in" ;;
      *) die "$src is not a .zip or .tar(.gz) archive nor a folder" ;;
    esac
  else die "$src does not exist; pass the archive or folder you downloaded after registering"; fi
  local hit; hit=$(find "$TMP/in" "$@" -print -quit)
  [ -n "$hit" ] || die "no expected files found in $src; is this the right archive?"
  dirname "$hit"
}

case "$CMD" in
  phantom)
    "$PY" -m trm_utils.data phantom "$DATA_DIR/phantom"
    ;;

  msd)
    FINAL="$DATA_DIR/Task01_BrainTumour"
    keep_existing msd "$FINAL"
    mkdir -p "$DATA_DIR"
    ARCHIVE="$DATA_DIR/Task01_BrainTumour.tar"
    PART="$ARCHIVE.part"
    if [ -f "$ARCHIVE" ] && [ "$(md5sum "$ARCHIVE" | cut -d' ' -f1)" = "$MSD_MD5" ]; then
      echo "archive $ARCHIVE already downloaded and verified"
    else
      [ -f "$ARCHIVE" ] && die "$ARCHIVE exists but its MD5 differs from $MSD_MD5; move it aside and run again"
      ok=0
      for attempt in $(seq 1 "$RETRIES"); do
        echo "downloading $MSD_URL (attempt $attempt/$RETRIES, resuming any partial file)"
        if curl -fL --connect-timeout 20 --speed-limit 1024 --speed-time 60 -C - -o "$PART" "$MSD_URL"; then ok=1; break; fi
        sleep "$(( attempt < 5 ? attempt : 5 ))"
      done
      [ "$ok" = 1 ] || die "download of $MSD_URL failed after $RETRIES attempts; the partial file $PART is kept, run again to resume"
      got=$(md5sum "$PART" | cut -d' ' -f1)
      if [ "$got" != "$MSD_MD5" ]; then
        rm -f "$PART"
        die "checksum mismatch for $MSD_URL: expected MD5 $MSD_MD5, got $got; the corrupt download was removed, run again"
      fi
      mv "$PART" "$ARCHIVE"
    fi
    TMP=$(mktemp -d "$DATA_DIR/.msd-extract.XXXXXX")
    tar -xf "$ARCHIVE" -C "$TMP" || die "extracting $ARCHIVE failed; nothing was put in place"
    [ -d "$TMP/Task01_BrainTumour" ] || die "$ARCHIVE has no Task01_BrainTumour folder; is TRM_MSD_URL right?"
    verify msd "$TMP/Task01_BrainTumour" >/dev/null
    mv "$TMP/Task01_BrainTumour" "$FINAL"
    echo "ok: $(verify msd "$FINAL")"
    echo "the archive $ARCHIVE is kept; delete it to free space"
    ;;

  iseg2019|fets2021)
    if [ "$CMD" = iseg2019 ]; then
      FINAL="$DATA_DIR/iSeg-2019-Training"; PROBE=(-iname 'subject-1-T1.hdr')
      SITE="register at https://iseg2019.web.unc.edu/ (the terms forbid redistribution), download iSeg-2019-Training"
    else
      FINAL="$DATA_DIR/MICCAI_FeTS2021_TrainingData"; PROBE=(-name 'partitioning_2.csv')
      SITE="register for FeTS 2021 (https://fets-ai.github.io/Challenge/data/, data on Synapse), download MICCAI_FeTS2021_TrainingData"
    fi
    keep_existing "$CMD" "$FINAL"
    if [ -z "$FROM" ]; then
      echo "$CMD cannot be downloaded automatically: $SITE, then run ./data_download.sh $CMD --from PATH" >&2
      exit 2
    fi
    mkdir -p "$DATA_DIR"
    TMP=$(mktemp -d "$DATA_DIR/.$CMD-import.XXXXXX")
    SRC=$(stage "$FROM" "${PROBE[@]}")
    verify "$CMD" "$SRC" >/dev/null
    mv "$SRC" "$FINAL"
    echo "ok: $(verify "$CMD" "$FINAL")"
    ;;

  verify)
    [ -n "${NAME:-}" ] || die "verify needs a dataset name: iseg2019, fets2021 or msd"
    case "$NAME" in
      iseg2019) D="$DATA_DIR/iSeg-2019-Training" ;; fets2021) D="$DATA_DIR/MICCAI_FeTS2021_TrainingData" ;;
      msd) D="$DATA_DIR/Task01_BrainTumour" ;; *) die "unknown dataset '$NAME'; use iseg2019, fets2021 or msd" ;;
    esac
    [ -e "$D" ] || D="$DATA_DIR"
    verify "$NAME" "$D"
    ;;

  -h|--help|help) usage ;;
  *) echo "error: unknown command '$CMD'" >&2; usage >&2; exit 2 ;;
esac
