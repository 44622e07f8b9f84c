"""Stage fetch: download (or copy) the CIFAR archive named by data.url and verify its md5."""
from pathlib import Path

from cifar_pipeline import stage
from cifar_pipeline.fetch import fetch, resolve_source


def main() -> None:
    parser = stage.parser(__doc__)
    parser.add_argument("--out", type=Path, required=True, help="where the verified archive goes")
    args = parser.parse_args()
    params = stage.load_params(args)
    data, cfg = params["data"], params["fetch"]
    url, md5 = resolve_source(data["dataset"], data["url"], data["md5"])
    fetch(url, md5, args.out, timeout_s=cfg["timeout_s"], retries=cfg["retries"])
    print(f"fetch: {url} -> {args.out} (md5 {md5} verified)")


if __name__ == "__main__":
    stage.run(main)
