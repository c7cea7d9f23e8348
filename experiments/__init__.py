"""The paper's experiments, run from the root of the repository (this folder is not installed with the package):

    python -m experiments.study --out=docs/study --workdir=runs/study --seeds=0,1,2
    python -m experiments.compare_regularisers --out=docs/regularisers.png --workdir=runs/regularisers

charts.py draws their figures with PIL.
"""
