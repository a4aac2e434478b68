from pathlib import Path
from typing import Annotated

import typer

from deeplab.config import load_params
from deeplab.download import fetch_dataset
from deeplab.stage import command
from deeplab.tracking import stage_run


def download(params: Annotated[Path, typer.Option(help="Params file to read (dataset.*); must hold every section.")]
             = Path("params.yaml"),
             out: Annotated[Path, typer.Option(help="Folder the dataset is downloaded (or generated) into.")]
             = Path("data/raw")) -> None:
    """Fetch the dataset named in params (the synthetic default is generated) into OUT."""
    p = load_params(params)
    with stage_run("download", p, params):
        fetch_dataset(p.dataset, out)


app = command(download)
if __name__ == "__main__":
    app()
