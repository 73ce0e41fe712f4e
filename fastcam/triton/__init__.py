"""The Triton backend (``backend="triton"``): kernels registered with ``torch.library.triton_op``.

Importing it imports triton; on a machine without a GPU, set ``TRITON_INTERPRET=1`` before
the import to run the kernels on CPU tensors (the tests do).
"""
