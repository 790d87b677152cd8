"""MTF Lab: the Streamlit entry point. It only declares the pages; each page calls the library."""

from pathlib import Path

import streamlit as st

# A local icon: a Material one is fetched from fonts.gstatic.com, an error on every page offline.
st.set_page_config(page_title="MTF Lab", page_icon=str(Path(__file__).parent / "ui" / "favicon.png"), layout="wide")

PAGES = [
    st.Page("pages/data.py", title="Data", icon=":material/database:", default=True),
    st.Page("pages/reward.py", title="Reward", icon=":material/functions:"),
    st.Page("pages/train.py", title="Train", icon=":material/model_training:"),
    st.Page("pages/weights.py", title="Weights by segment", icon=":material/pie_chart:"),
    st.Page("pages/compare.py", title="Compare", icon=":material/compare_arrows:"),
    st.Page("pages/report.py", title="Report", icon=":material/description:"),
]
st.navigation(PAGES).run()
