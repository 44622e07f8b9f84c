"""Stage train: train the scratch CNN named by train.arch on the TFRecords, log with DVCLive."""
from pathlib import Path

from cifar_pipeline import plots, stage


def main() -> None:
    parser = stage.parser(__doc__)
    parser.add_argument("--records", type=Path, required=True)
    parser.add_argument("--prepared", type=Path, required=True, help="for class names and channel stats")
    parser.add_argument("--model", type=Path, required=True, help="output .keras file")
    parser.add_argument("--live-dir", type=Path, required=True, help="DVCLive directory")
    parser.add_argument("--curves-png", type=Path, required=True)
    parser.add_argument("--checkpoint-dir", type=Path, required=True,
                        help="state after each epoch, to resume a killed run; not a DVC output")
    args = parser.parse_args()
    cfg = stage.load_params(args)["train"]
    stage.set_seed(cfg["seed"], cfg.pop("deterministic"))
    from cifar_pipeline.scratch import train_scratch

    history = train_scratch(records_dir=args.records, prepared_dir=args.prepared, model_path=args.model,
                            live_dir=args.live_dir, checkpoint_dir=args.checkpoint_dir, **cfg)
    if history is not None:  # None: a worker of a cluster other than the chief
        plots.learning_curves(history, f"Scratch CNN ({cfg['arch']})", args.curves_png)


if __name__ == "__main__":
    stage.run(main)
