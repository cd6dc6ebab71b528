//! A real registry for tests (placeholder).
