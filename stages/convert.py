"""DVC stage `convert@<dataset>`: convert a dataset's raw files into LMDB.

Writes data/lmdb/<dataset>/{train,val}/, one LMDB environment per split with its metadata;
the folder appears only once every split is complete.
"""

import json

import repo_root  # noqa: F401  (first: this checkout's sdn)

from sdn.data.lmdb_store import inspect_dataset
from sdn.data.sources import convert_dataset
from sdn.params import dataset_config, load_params
from sdn.pipeline import DATA, lmdb_dir, raw_dir, run_stage


def main(name: str) -> None:
    cfg = dataset_config(load_params(), name)  # checked whole by the source before any work
    convert_dataset(name, cfg, raw_dir(name).parent, lmdb_dir(name).parent)
    summary = inspect_dataset(name, DATA)
    print(json.dumps(summary["splits"]))


if __name__ == "__main__":
    run_stage(main, "python stages/convert.py <dataset>")
