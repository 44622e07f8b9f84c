"""Stage train_head: fit a classification head on cached features; save backbone + head (not yet fine-tuned)."""
from pathlib import Path

from cifar_pipeline import plots, stage


def main() -> None:
    parser = stage.parser(__doc__)
    parser.add_argument("--features", type=Path, required=True)
    parser.add_argument("--prepared", type=Path, required=True, help="for labels and class names")
    parser.add_argument("--extractor", type=Path, required=True)
    parser.add_argument("--model", type=Path, required=True, help="output end-to-end .keras model")
    parser.add_argument("--live-dir", type=Path, required=True, help="DVCLive directory")
    parser.add_argument("--curves-png", type=Path, required=True)
    args = parser.parse_args()
    params = stage.load_params(args)
    cfg = params["head"]
    stage.set_seed(cfg["seed"])
    from cifar_pipeline.head import train_head

    history = train_head(features_dir=args.features, prepared_dir=args.prepared, extractor_path=args.extractor,
                         model_path=args.model, live_dir=args.live_dir, **cfg)
    plots.learning_curves(history, f"Transfer head ({cfg['kind']})", args.curves_png,
                          x_label="trees" if cfg["kind"] == "random_forest" else "epoch")


if __name__ == "__main__":
    stage.run(main)
