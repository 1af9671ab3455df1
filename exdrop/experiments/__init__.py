"""The paper's experiments: the generated prototxt variants (and the WRN nets), sweeps of methods x
data sets x rates x seeds (Tables 2-4), and the runtime benches (Table 6)."""
