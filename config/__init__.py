"""The trainers' command lines: flags, the tiny and paper presets, the checks made before any work starts."""
