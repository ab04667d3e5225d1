//! SVG plots, written by hand.
