"""Stage export: one trained model as a TensorFlow SavedModel, ONNX and LiteRT, each checked on the test images."""
from pathlib import Path

from cifar_pipeline import stage


def main() -> None:
    parser = stage.parser(__doc__)
    parser.add_argument("--model", type=Path, required=True, help="a .keras model saved by a training stage")
    parser.add_argument("--prepared", type=Path, required=True, help="class names and the test images")
    parser.add_argument("--out", type=Path, required=True, help="output directory of the exported files")
    parser.add_argument("--metrics", type=Path, required=True, help="output JSON: each format's checks")
    args = parser.parse_args()
    cfg = stage.load_params(args)["export"]
    from cifar_pipeline.export import export

    report = export(model_path=args.model, prepared_dir=args.prepared, out_dir=args.out, metrics_path=args.metrics,
                    **cfg)
    for fmt, checks in report.items():
        rebuild = checks.get("rebuild_difference")
        print(f"export: {args.out}: {fmt} in {checks['export_s']} s, {checks['megabytes']} MB, test accuracy "
              f"{checks['test_accuracy']:.2%} (one view), largest probability "
              f"difference {checks['max_probability_difference']:.1e}"
              + ("" if rebuild is None else f" (float32 rebuild: {rebuild:.1e} from the trained model in float32)")
              + f", top-1 as trained on {checks['top1_agreement']:.2%} of the test images")


if __name__ == "__main__":
    stage.run(main)
