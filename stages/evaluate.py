"""Stage evaluate: score one saved model on the test split; write metrics, confusion data, plots."""
from pathlib import Path

from cifar_pipeline import stage
from cifar_pipeline.errors import PipelineError


def main() -> None:
    parser = stage.parser(__doc__)
    parser.add_argument("--name", required=True, help="the model's name in titles")
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--prepared", type=Path, required=True)
    parser.add_argument("--features", type=Path, help="cached test features to score a transfer model's head on")
    parser.add_argument("--metrics", type=Path, required=True, help="output metrics JSON")
    parser.add_argument("--per-class", type=Path, required=True, help="output per-class precision/recall/F1 JSON")
    parser.add_argument("--predictions", type=Path, required=True, help="output CSV for the confusion plot")
    parser.add_argument("--confused-pairs", type=Path, required=True, help="output CSV of the most confused pairs")
    parser.add_argument("--confusion-png", type=Path, required=True)
    parser.add_argument("--misclassified-png", type=Path, required=True)
    args = parser.parse_args()
    cfg = stage.load_params(args)["evaluate"]
    # Each model has its own test-time augmentation: evaluate.tta_<name>.
    tta = {key.removeprefix("tta_"): cfg.pop(key) for key in list(cfg) if key.startswith("tta_")}
    if args.name not in tta:
        raise PipelineError(f"params.yaml has no evaluate.tta_{args.name} for the model named {args.name!r}")
    from cifar_pipeline.evaluate import evaluate

    metrics = evaluate(model_path=args.model, prepared_dir=args.prepared, name=args.name,
                       metrics_path=args.metrics, per_class_path=args.per_class, predictions_path=args.predictions,
                       confused_pairs_path=args.confused_pairs,
                       confusion_png=args.confusion_png, misclassified_png=args.misclassified_png,
                       tta=tta[args.name], features_dir=args.features, **cfg)
    print(f"evaluate: {args.name}: test accuracy {metrics['accuracy']:.4f}, loss {metrics['loss']:.4f}")


if __name__ == "__main__":
    stage.run(main)
