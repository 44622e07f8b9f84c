"""Stage prepare: unpickle the archive safely, split off validation, write arrays and stats."""
from pathlib import Path

from cifar_pipeline import plots, stage
from cifar_pipeline.prepare import load_split, prepare


def main() -> None:
    parser = stage.parser(__doc__)
    parser.add_argument("--archive", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="directory for the split arrays and meta.json")
    parser.add_argument("--samples-png", type=Path, required=True)
    args = parser.parse_args()
    data = stage.load_params(args)["data"]
    meta = prepare(args.archive, args.out, dataset=data["dataset"], label_mode=data["label_mode"],
                   val_fraction=data["val_fraction"], limit=data["limit"], test_limit=data["test_limit"],
                   seed=data["seed"])
    train = load_split(args.out, "train", mmap=True)
    plots.samples_per_class(train.images, train.labels, meta["class_names"], args.samples_png)
    print(f"prepare: {meta['sizes']} images, {len(meta['class_names'])} classes, "
          f"mean {meta['mean']}, std {meta['std']}")


if __name__ == "__main__":
    stage.run(main)
