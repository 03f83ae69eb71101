"""Imported first by every stage script: puts the repository that holds the script first on
`sys.path`, so that `import sdn` loads this checkout's code wherever DVC runs the stage (the
workspace, an experiment's temporary copy in .dvc/tmp/exps, a queue worker) and whichever checkout
the environment's editable install points at. Python puts only `stages/` itself there."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if sys.path[:1] != [str(ROOT)]:
    sys.path.insert(0, str(ROOT))
