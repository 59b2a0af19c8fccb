"""Quality of a finished run: seams, fidelity, nuclei, its report and figures."""
