"""Download CIFAR-10 or GTSRB from its official address, verified, resumable.

    python -m linfjax.fetch [cifar10] DIR   # CIFAR-10 (the name may be left out)
    python -m linfjax.fetch gtsrb DIR       # GTSRB

The work is linfjax/data/fetch_cifar.py's and linfjax/data/fetch_gtsrb.py's; this module is
the command line.

CIFAR-10 downloads `cifar-10-python.tar.gz` (163 MB) into DIR from the CIFAR-10 page's
address, resuming an interrupted download where it stopped (HTTP Range), checks its size and
the MD5 the page publishes, unpacks `DIR/cifar-10-batches-py/` (the full set: the full
configs read it with `--config.data.source=cifar10_dir --config.data.path=DIR`), and writes
the quick configs' subset to `DIR/cifar10-subset/`: the first 1,017 images of each of the six
batch files, in their order, in the original file format, with a SHA256SUMS file. Those
files are byte for byte the quick runs' reference subset (SUBSET_SHA256 is checked), so a
quick run on them is the README's quick run:

    python -m linfjax.main --config=configs/cifar_patch.py:quick --workdir=runs/quick \\
        --config.data.path=DIR/cifar10-subset

GTSRB downloads its three official archives (348 MB), checked the same way, and unpacks
DIR/GTSRB/ as GTSRB ships it; the GTSRB configs then read `--config.data.path=DIR`.

Rerunning the command skips what is already done and verified. Nothing is unpacked outside
`DIR/cifar-10-batches-py/` (or `DIR/GTSRB/`): an archive member with an absolute path, `..`,
a link or a device is refused, as is any file other than the dataset's.

"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from linfjax import errors
from linfjax.data import download, fetch_cifar, fetch_gtsrb

DATASETS = ("cifar10", "gtsrb")  # The first argument names one of these, or is DIR.


def _parse(argv: Sequence[str]) -> tuple[str, str, argparse.Namespace]:
  """(dataset, DIR, flags) from the command line; FetchError for a misuse (one line)."""
  parser = argparse.ArgumentParser(
      prog="python -m linfjax.fetch", usage="%(prog)s [cifar10 | gtsrb] DIR [flags]",
      description=__doc__.split("\n\n")[0],
      epilog="Then, on CIFAR-10: python -m linfjax.main --config=configs/cifar_patch.py:quick "
             "--workdir=runs/quick --config.data.path=DIR/cifar10-subset; on GTSRB: python -m "
             "linfjax.main --config=configs/gtsrb_patch.py:quick --workdir=runs/gtsrb "
             "--config.data.path=DIR")
  parser.add_argument("dataset", metavar="DATASET", help=f"one of {', '.join(DATASETS)}; "
                      "without it, the one argument is DIR and the dataset CIFAR-10")
  parser.add_argument("directory", metavar="DIR", nargs="?", help="where the archives and "
                      "the unpacked dataset (CIFAR-10: and the subset) go (created)")
  parser.add_argument("--url", help=f"cifar10: the archive's address (default: {fetch_cifar.URL}); a "
                      "mirror must serve the same file (its MD5 is checked)")
  parser.add_argument("--no_subset", action="store_true", help="cifar10: no subset")
  parser.add_argument("--base_url", help="gtsrb: the folder holding the three archives "
                      "(default: the official one); a mirror must serve the same files")
  args = parser.parse_args(argv[1:])
  dataset, directory = args.dataset, args.directory
  if directory is None:
    if dataset in DATASETS:
      raise download.FetchError(f"DIR is missing: python -m linfjax.fetch {dataset} DIR")
    dataset, directory = "cifar10", args.dataset
  elif dataset not in DATASETS:
    raise download.FetchError(f"unknown dataset {dataset!r}; known: {', '.join(DATASETS)} (or give "
                     "only DIR for CIFAR-10)")
  for flag, value, owner in (("--url", args.url, "cifar10"), ("--no_subset", args.no_subset,
                             "cifar10"), ("--base_url", args.base_url, "gtsrb")):
    if value and dataset != owner:
      raise download.FetchError(f"{flag} is a flag of {owner}, not of {dataset}; drop it")
  return dataset, directory, args


def main(argv: Sequence[str]) -> int:
  try:
    dataset, directory, args = _parse(argv)
    if dataset == "gtsrb":
      paths = fetch_gtsrb.fetch_gtsrb(directory, base_url=args.base_url or fetch_gtsrb.BASE_URL,
                                      progress=sys.stderr.isatty())
    else:
      paths = fetch_cifar.fetch(directory, url=args.url or fetch_cifar.URL, subset=not args.no_subset,
                    progress=sys.stderr.isatty())
  except (errors.UserError, OSError) as e:
    user_error = errors.from_os_error(e) if isinstance(e, OSError) else e
    if user_error is None:
      raise
    print(f"error: {errors.one_line(user_error)}", file=sys.stderr)
    return errors.EXIT_USER_ERROR
  if dataset == "gtsrb":
    print("Quick run on GTSRB:\n  python -m linfjax.main --config=configs/gtsrb_patch.py:quick "
          f"--workdir=runs/gtsrb --config.data.path={paths['data']}")
  if "subset" in paths:
    print("Quick run on the subset:\n  python -m linfjax.main --config=configs/cifar_patch.py:"
          f"quick --workdir=runs/quick --config.data.path={paths['subset']}")
  if "full" in paths:
    print("Full configs on the full set:\n  python -m linfjax.main --config=configs/cifar_patch.py "
          "--workdir=runs/patch --config.data.source=cifar10_dir --config.data.path="
          f"{paths['full']}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
