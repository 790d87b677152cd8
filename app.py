"""MTF Lab: the Streamlit entry point. It only declares the pages; each page calls the library."""

import streamlit as st

st.set_page_config(page_title="MTF Lab", page_icon=":material/tune:", layout="wide")

PAGES = [
    st.Page("pages/data.py", title="Data", icon=":material/database:", default=True),
]
st.navigation(PAGES).run()
