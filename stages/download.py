"""DVC stage `download@<dataset>`: fetch (remote) or build (offline) a dataset's raw files.

Writes data/raw/<dataset>/: a verified archive for cifar10, imagenet32, celebahq256 and
3dshapes (a partial download resumes), `.npy` arrays for photos32 and sprites.
"""

import repo_root  # noqa: F401  (first: this checkout's sdn)

from sdn.data.sources import download_dataset
from sdn.params import dataset_config, load_params
from sdn.pipeline import raw_dir, run_stage


def main(name: str) -> None:
    cfg = dataset_config(load_params(), name)  # checked whole by the source before any work
    path = download_dataset(name, cfg, raw_dir(name).parent)
    print(f"[sdn] {name}: raw files in {path}")


if __name__ == "__main__":
    run_stage(main, "python stages/download.py <dataset>")
