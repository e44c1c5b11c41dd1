"""Measuring and reporting: metrics (CER, Gen-PPL, MAUVE, PRDC, PSNR), experiment records and reports, the
docs' results page, the step-by-step decoding trace."""
