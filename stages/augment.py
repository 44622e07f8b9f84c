"""Stage augment: cache augmented training copies and un-augmented val/test as TFRecord shards."""
from pathlib import Path

from cifar_pipeline import plots, stage


def main() -> None:
    parser = stage.parser(__doc__)
    parser.add_argument("--prepared", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="directory for the shards")
    parser.add_argument("--preview-png", type=Path, required=True)
    args = parser.parse_args()
    cfg = stage.load_params(args)["augment"]
    stage.set_seed(cfg["seed"])
    from cifar_pipeline.augment import build_records  # imports TensorFlow: after argument checks

    preview = build_records(args.prepared, args.out, copies=cfg["copies"], flip=cfg["flip"],
                            shift=cfg["shift"], rotation_deg=cfg["rotation_deg"], zoom=cfg["zoom"],
                            shards=cfg["shards"], seed=cfg["seed"])
    plots.augmentation_preview(preview["original"], preview["copies"], args.preview_png)
    print(f"augment: wrote {cfg['shards']} shards per split with {cfg['copies']} augmented copies to {args.out}")


if __name__ == "__main__":
    stage.run(main)
