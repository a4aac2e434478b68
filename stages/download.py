from pathlib import Path

from deeplab.config import load_params
from deeplab.download import fetch_dataset
from deeplab.stage import command
from deeplab.tracking import stage_run


def download(params: Path = Path("params.yaml"), out: Path = Path("data/raw")) -> None:
    """Fetch the dataset named in params (the synthetic default is generated) into OUT."""
    p = load_params(params)
    with stage_run("download", p, params):
        fetch_dataset(p.dataset, out)


app = command(download)
if __name__ == "__main__":
    app()
