"""Time `hf_uwm.evaluation.evaluate_model` on N random quadruples with a tiny random CLIP.

    python benchmarks/bench_evaluation.py --n 1000 [--batch-size 64] [--bootstrap 1000] [--device cpu] [--threads 1]

Builds the same tiny CLIP as the tests (3 layers, width 32, 32x32 images, the real CLIP tokenizer
from tests/fixtures), so the time measures the pipeline's overhead (data decoding, preprocessing,
batching, retrieval, bootstrap) more than model compute. On a busy machine with few cores, torch's
default thread count can make such small matmuls many times slower: compare with --threads 1.
"""

import argparse
import time
from pathlib import Path

import numpy as np
import torch

TOKENIZER = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "clip-tokenizer"
LAYERS = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4)


def tiny_clip(device):
    from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    torch.manual_seed(0)
    config = CLIPConfig(text_config=dict(LAYERS, vocab_size=49408, max_position_embeddings=32),
                        vision_config=dict(LAYERS, image_size=32, patch_size=8), projection_dim=16)
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = CLIPProcessor(image_processor=images, tokenizer=AutoTokenizer.from_pretrained(TOKENIZER))
    return CLIPModel(config).to(device).eval(), processor


def random_quadruples(n, seed=0):
    import datasets
    from PIL import Image

    rng = np.random.default_rng(seed)
    words = "cat dog car tree house person street table bird horse".split()

    def image():
        return Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))

    safe = [f"a photo of a {words[i % len(words)]} number {i}" for i in range(n)]
    data = {"safe_text": safe, "unsafe_text": [s + " with a bloody knife" for s in safe],
            "safe_image": [image() for _ in range(n)], "unsafe_image": [image() for _ in range(n)]}
    features = datasets.Features({"safe_text": datasets.Value("string"), "unsafe_text": datasets.Value("string"),
                                  "safe_image": datasets.Image(), "unsafe_image": datasets.Image()})
    return datasets.Dataset.from_dict(data, features=features)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="number of quadruples")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from hf_uwm.evaluation import embed_quadruples, evaluate_model, retrieval_recalls

    model, processor = tiny_clip(args.device)
    dataset = random_quadruples(args.n)
    evaluate_model(model, processor, dataset.select(range(min(8, args.n))), bootstrap=0, progress=False)  # warm-up

    start = time.perf_counter()
    report = evaluate_model(model, processor, dataset, batch_size=args.batch_size, bootstrap=args.bootstrap,
                            progress=False)
    total = time.perf_counter() - start

    start = time.perf_counter()
    embeddings = embed_quadruples(model, processor, dataset, batch_size=args.batch_size, progress=False)
    embed = time.perf_counter() - start
    start = time.perf_counter()
    retrieval_recalls(embeddings)
    retrieval = time.perf_counter() - start

    print(report)
    print(f"\n{args.n} quadruples on {args.device} (torch threads {torch.get_num_threads()}): "
          f"evaluate_model {total:.2f} s (embedding {embed:.2f} s, retrieval {retrieval:.3f} s, "
          f"SafeGround + {args.bootstrap} bootstrap resamples the rest)")


if __name__ == "__main__":
    main()
