"""Data stages: download (yt-dlp, synthetic, local) and extract (ffmpeg frames + log-mel)."""
