"""Stage finetune: train the backbone end to end with the converged head, on augmented images."""
from pathlib import Path

from cifar_pipeline import plots, stage


def main() -> None:
    parser = stage.parser(__doc__)
    parser.add_argument("--head-model", type=Path, required=True, help="the transfer model that train_head saved")
    parser.add_argument("--records", type=Path, required=True)
    parser.add_argument("--prepared", type=Path, required=True, help="for class names")
    parser.add_argument("--model", type=Path, required=True, help="output fine-tuned .keras model")
    parser.add_argument("--live-dir", type=Path, required=True, help="DVCLive directory")
    parser.add_argument("--curves-png", type=Path, required=True)
    parser.add_argument("--checkpoint-dir", type=Path, required=True,
                        help="state after each epoch, to resume a killed run; not a DVC output")
    args = parser.parse_args()
    cfg = stage.load_params(args)["finetune"]
    stage.set_seed(cfg["seed"])
    from cifar_pipeline.finetune import finetune

    history = finetune(head_model_path=args.head_model, records_dir=args.records, prepared_dir=args.prepared,
                       model_path=args.model, live_dir=args.live_dir, checkpoint_dir=args.checkpoint_dir, **cfg)
    plots.learning_curves(history, "Transfer model, fine-tuned", args.curves_png)


if __name__ == "__main__":
    stage.run(main)
