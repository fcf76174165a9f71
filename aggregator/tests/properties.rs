//! Property tests over the aggregator's own input files, the stand-in for a coverage-guided
//! fuzzer (which needs a nightly toolchain): the pricing catalog, the analytics policy file and
//! demand CSVs (`flotilla forecast --csv`). The property is "returns, never panics"; a parsed
//! CSV also goes onto the hourly grid the forecasts use, which must stay within its bound.
//! Stored-record decoding is covered beside the store (`store::tests`), where its decoders are.
//! CI runs the `proptest` default of 256 cases per target; a longer run:
//! `PROPTEST_CASES=20000 cargo test -p aggregator --test properties --release`.

use aggregator::analytics::cost::PricingCatalog;
use aggregator::analytics::series::{HourlySeries, MAX_SLOTS, parse_csv, parse_time};
use aggregator::analytics::settings::Settings;
use proptest::prelude::*;

const PRICING: &str = include_str!("../../config/pricing.toml");
const POLICY: &str = include_str!("../../config/analytics.example.toml");

/// `example` with every `key = value` line's value replaced by `value`.
fn every_key_set_to(example: &str, value: &str) -> String {
    let mut out = String::with_capacity(example.len());
    for line in example.lines() {
        match line.split_once(" = ") {
            Some((key, _)) if !line.trim_start().starts_with('#') => {
                out.push_str(key);
                out.push_str(" = ");
                out.push_str(value);
            }
            _ => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

proptest! {
    #[test]
    fn policy_and_pricing_files_never_panic(text in "(\\[{1,2}[a-z_.\"]{0,16}\\]{1,2}\n|[a-z_]{1,24} = (\"[^\"\n]{0,20}\"|-?[0-9.e]{1,20}|true|\\[[0-9, .]{0,12}\\]|\\{[a-z =0-9,]{0,20}\\})\n|.{0,40}\n){0,16}") {
        let _ = PricingCatalog::parse(&text, "prop.toml");
        let _ = Settings::parse(&text, "prop.toml");
    }

    #[test]
    fn real_keys_with_hostile_values_are_accepted_or_refused(
        n in any::<i64>(), f in any::<f64>(), s in ".{0,40}",
    ) {
        for example in [PRICING, POLICY] {
            for value in [n.to_string(), format!("{f:?}"), format!("{s:?}"), "[]".into(), "{}".into()] {
                let text = every_key_set_to(example, &value);
                let _ = PricingCatalog::parse(&text, "prop.toml");
                let _ = Settings::parse(&text, "prop.toml");
            }
        }
    }

    #[test]
    fn demand_csvs_parse_or_err_and_what_parses_fits_the_grid(
        rows in proptest::collection::vec(
            (
                prop_oneof![
                    "20[0-9]{2}-[01][0-9]-[0-3][0-9]( |T)[0-2][0-9]:[0-5][0-9](:[0-5][0-9])?(Z|[+-][01][0-9]:[0-5][0-9])?",
                    any::<i64>().prop_map(|n| n.to_string()),
                    ".{0,30}",
                ],
                prop_oneof![
                    any::<f64>().prop_map(|v| v.to_string()),
                    "-?[0-9]{0,12}(\\.[0-9]{0,6})?(e[+-]?[0-9]{1,4})?",
                    "(nan|NaN|inf|-inf|)",
                ],
            ),
            0..60,
        ),
        header in prop_oneof![Just("time,value\n".to_owned()), ".{0,30}\n"],
    ) {
        let mut text = header;
        for (t, v) in &rows {
            text.push_str(&format!("{t},{v}\n"));
        }
        if let Ok(points) = parse_csv(&text) {
            let grid = HourlySeries::from_points(points.iter().copied());
            prop_assert!(grid.len() <= MAX_SLOTS, "{} slots", grid.len());
            prop_assert!(grid.values.iter().flatten().all(|v| v.is_finite()));
        }
        for (t, _) in &rows {
            let _ = parse_time(t);
        }
    }
}
