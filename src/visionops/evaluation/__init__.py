"""What every task's evaluation shares: calibration, latency, plots and the HTML report."""
