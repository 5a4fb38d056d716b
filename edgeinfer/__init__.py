"""edgeinfer: run quantized language models on the machine in front of you, through llama.cpp.
Everything the CLI does is a function of `edgeinfer.api` (run, chat, pull, quantize, bench);
heavy dependencies (llama_cpp, numpy, huggingface_hub) are imported only where needed."""

__version__ = "0.1.0"
