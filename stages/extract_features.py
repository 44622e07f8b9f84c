"""Stage extract_features: run the frozen transfer.backbone over every split once, cache features."""
from pathlib import Path

from cifar_pipeline import stage


def main() -> None:
    parser = stage.parser(__doc__)
    parser.add_argument("--prepared", type=Path, required=True)
    parser.add_argument("--features", type=Path, required=True, help="output directory of feature arrays")
    parser.add_argument("--extractor", type=Path, required=True, help="output .keras feature extractor")
    args = parser.parse_args()
    cfg = stage.load_params(args)["transfer"]
    # Random-init backbones (weights: none) must be the same network on every run.
    stage.set_seed(cfg.pop("seed"))
    from cifar_pipeline.features import extract_features

    extract_features(prepared_dir=args.prepared, features_dir=args.features, extractor_path=args.extractor,
                     **cfg)


if __name__ == "__main__":
    stage.run(main)
