"""Tokenizers: the image and audio VQGANs, the vocoder, their training and batch tokenizing."""
