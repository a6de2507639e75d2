//! `CPUCONV_REQUIRE_ISAS`: the tests iterate `cpuconv::testing::isas_under_test()`,
//! which is every path this CPU supports, and which panics when the variable
//! lists a path the CPU cannot run (so a CI machine without, say, AVX-512
//! fails loudly instead of passing on the paths it has). This test documents
//! that contract for the current process: run it as
//! `CPUCONV_REQUIRE_ISAS=avx512,avx2 cargo test --test require_isas` to make
//! a machine prove it runs those paths.

use cpuconv::arch::supported_isas;
use cpuconv::testing::isas_under_test;
use cpuconv::Isa;

#[test]
fn isas_under_test_are_every_supported_isa_and_every_required_one() {
    let isas = isas_under_test();
    assert_eq!(isas, supported_isas());
    // Portable runs everywhere; every listed path really is supported.
    assert!(isas.contains(&Isa::Portable), "{isas:?}");
    assert!(isas.iter().all(|isa| isa.is_supported()), "{isas:?}");
    let required = std::env::var("CPUCONV_REQUIRE_ISAS").unwrap_or_default();
    for name in required.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        // isas_under_test() panicked above for a name that is no path.
        let isa = Isa::from_name(name).expect("a path name");
        assert!(
            isas.contains(&isa),
            "CPUCONV_REQUIRE_ISAS lists {isa}, which is not under test: {isas:?}"
        );
    }
    println!(
        "paths under test: {}; required: {required:?}",
        isas.iter().map(|i| i.name()).collect::<Vec<_>>().join(", ")
    );
}
