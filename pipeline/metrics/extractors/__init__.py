"""Feature extractors of the paper's metrics, with the official architectures and key names.

One module per network; each holds the `nn.Module` (state-dict names equal to the official
checkpoint's, so the user's local file loads strictly) and an extractor class with `name`, `dim`,
`sample_rate` (audio), `sha256` of the loaded file, `embed(...)` and
`from_checkpoint(path, device)`:

- `panns.PannsExtractor`: PANNs Cnn14 16 kHz, FD rows (1, 2048) and IS logits (527,);
- `vggish.VggishExtractor`: VGGish, FAD rows (n_examples, 128), pre-ReLU, no PCA;
- `clip_image.ClipImageExtractor`: CLIP ViT-B/32 image tower, (512,) unit norm, for CS;
- `wav2clip.Wav2ClipExtractor`: Wav2CLIP audio encoder, (512,), for CS.

`audio_io` turns files or arrays into audioldm_eval's 16 kHz evaluation waveform; `common` holds
the shared checkpoint reading. Nothing here downloads weights: randomly initialised networks are
for tests only and never give a reported number. What each network must match is in
docs/references.md, "Paper-protocol metrics".
"""
