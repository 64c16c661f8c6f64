from setuptools import find_packages, setup

# Every lower bound below is a version the test suite was run against: .ci/run installs them all at once
# (.ci/floors.txt, generated from this file by .ci/make_floors.py) in a second venv and runs the tests there.
# Declare each package once (the extras share the names below); a package without a bound gets its newest release.
#
# torch: 2.5.1, not older. diffusers 0.36's attention dispatch passes enable_gqa to scaled_dot_product_attention,
# which torch 2.4 lacks. (pip on x86_64 gets torch's CUDA build from PyPI, ~3 GB with its nvidia wheels: about a
# minute to download here, and the floor venv is the one place CI pays for it.)
TORCH = "torch>=2.5.1"
TORCHVISION = "torchvision>=0.20.1"  # the release built for torch 2.5.1
# diffusers 0.35.x does not import beside transformers 5: its pipeline loading imports transformers' FLAX_WEIGHTS_NAME.
# torch.compile(fullgraph=True) of the decoder needs diffusers >= 0.38 (older ones break the graph in their attention
# dispatch); raising the floor for that would also force safetensors >= 0.8, so the two compile tests skip below it.
DIFFUSERS = "diffusers>=0.36.0"
HUGGINGFACE_HUB = "huggingface_hub>=1.3.0"  # transformers 5.0 requires >= 1.3
SAFETENSORS = "safetensors>=0.4.3"  # accelerate and transformers 5.0 require >= 0.4.3
TRANSFORMERS = "transformers>=5.0.0"  # the MaskGiT prior's BERT encoder stack
# accelerate: MaskGiT training calls extract_model_from_parallel(keep_torch_compile=...), new in 1.3. FSDP2 training
# (fsdp_version=2 with full state dicts) needs accelerate >= 1.7 and torch >= 2.6, which Accelerate checks itself;
# its test skips below them.
ACCELERATE = "accelerate>=1.3.0"
DATASETS = "datasets>=3.0.0"
# torchdata: its StatefulDataLoader (new in 0.8) saves every DataLoader worker's stream position, which makes
# streaming resumption exact; 0.8.0 is tested with torch 2.5.1 (it declares only torch >= 2).
TORCHDATA = "torchdata>=0.8.0"
LPIPS = "lpips>=0.1.4"
SCIKIT_IMAGE = "scikit-image>=0.24.0"  # 0.22 and 0.23 are built against numpy 1 and fail to import with numpy 2
EVALUATE = "evaluate>=0.4.0"
PYTORCH_FID = "pytorch-fid>=0.3.0"
# gradio: the demo page (examples/demo/app.py). 6.0 moved `theme` from Blocks to launch(), which the page uses; 6.0.0
# installs at the floors (with huggingface_hub 1.3.0 and torch 2.5.1; pip then takes Pillow 11.3) and the browser
# test passes there.
GRADIO = "gradio>=6.0.0"
# playwright: the browser test drives the system's Chromium with it (`executable_path`; Playwright's own browser
# download is never used). 1.50.0 is tested against Debian's Chromium 156.
PLAYWRIGHT = "playwright>=1.50.0"

setup(
    name="flowmo-diffusers",
    version="0.1.0",
    description="FlowMo image tokenizer (Sargent et al., 2025) for diffusers, Accelerate and datasets",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    package_dir={"": "src"},
    packages=find_packages("src"),
    include_package_data=True,
    python_requires=">=3.10",
    install_requires=[
        TORCH,
        DIFFUSERS,
        HUGGINGFACE_HUB,
        "filelock",  # the output-folder lock (also a dependency of huggingface_hub)
        SAFETENSORS,
        "numpy",
        "Pillow",
        "pyyaml",
        TRANSFORMERS,
    ],
    extras_require={
        "train": [
            ACCELERATE,
            DATASETS,
            TORCHDATA,
            TORCHVISION,
            LPIPS,
            "tensorboard",
            SCIKIT_IMAGE,
        ],
        "eval": [
            EVALUATE,
            PYTORCH_FID,
            "scipy",
            SCIKIT_IMAGE,
            LPIPS,
            TORCHVISION,
            ACCELERATE,
            DATASETS,
            TORCHDATA,
            "matplotlib",
        ],
        "demo": [GRADIO],
        "test": [
            "pytest>=7.0.0",
            GRADIO,  # tests/examples/test_demo_page.py: the demo page in a headless browser
            PLAYWRIGHT,
            ACCELERATE,
            DATASETS,
            TORCHDATA,
            EVALUATE,
            PYTORCH_FID,
            TORCHVISION,
            LPIPS,
            "scipy",
            SCIKIT_IMAGE,
            "tensorboard",
            "wandb",
            "matplotlib",
        ],
    },
)
