//! The worker's power and thermal policy: what the OS says about the
//! battery, the charger and the temperature, and whether the node takes
//! tasks now. A phone stops below a battery level, while unplugged when
//! told to, and above a temperature until it has cooled below a lower
//! one; the task running then is handed back (the client gives it to
//! another worker) and work resumes when conditions return.
//!
//! Read from Linux's sysfs (Android included): `power_supply/*/{type,
//! online, status, capacity}` and `thermal/thermal_zone*/temp`
//! (millidegrees Celsius), under a root the configuration names, so tests
//! point it at a fake tree.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// The `[power]` settings. Every check is off by default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PowerPolicy {
    /// Take tasks only on mains power.
    pub only_when_charging: bool,
    /// On battery, take no task below this charge, in percent (0: off).
    pub min_battery_percent: u32,
    /// Pause above this temperature, in degrees Celsius (0: off) ...
    pub pause_above_celsius: f32,
    /// ... and work again once below this one.
    pub resume_below_celsius: f32,
    /// Seconds between two readings.
    pub check_secs: u64,
    /// Where sysfs' classes are (`power_supply/`, `thermal/`).
    pub sysfs: std::path::PathBuf,
}

impl Default for PowerPolicy {
    fn default() -> Self {
        Self {
            only_when_charging: false,
            min_battery_percent: 0,
            pause_above_celsius: 0.0,
            resume_below_celsius: 0.0,
            check_secs: 10,
            sysfs: "/sys/class".into(),
        }
    }
}

/// What the OS says now; `None` where it says nothing.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Reading {
    /// On mains power (a charger online, or a battery charging or full).
    pub mains: Option<bool>,
    /// The battery's charge, 0-100.
    pub battery_percent: Option<u32>,
    /// The hottest thermal zone, in degrees Celsius.
    pub celsius: Option<f32>,
}

impl Reading {
    /// Mains or battery, as adverts say it.
    pub fn power(&self) -> protocol::Power {
        match self.mains {
            Some(true) => protocol::Power::Plugged,
            Some(false) => protocol::Power::Battery,
            None => protocol::Power::Unknown,
        }
    }
}

/// Reads the power supplies and thermal zones under `sysfs`.
pub fn read(sysfs: &Path) -> Reading {
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default().trim().to_string();
    let mut r = Reading::default();
    let mut battery_seen = false;
    let supplies = std::fs::read_dir(sysfs.join("power_supply"));
    let supplies_listed = supplies.is_ok();
    for e in supplies.into_iter().flatten().flatten() {
        let d = e.path();
        match read(&d.join("type")).as_str() {
            "Mains" | "USB" | "Wireless" if read(&d.join("online")) == "1" => {
                r.mains = Some(true);
            }
            "Battery" => {
                battery_seen = true;
                if matches!(read(&d.join("status")).as_str(), "Charging" | "Full") {
                    r.mains = Some(true);
                }
                if let Ok(c) = read(&d.join("capacity")).parse::<u32>()
                    && c <= 100
                {
                    // The emptiest battery decides.
                    r.battery_percent = Some(r.battery_percent.map_or(c, |b| b.min(c)));
                }
            }
            _ => {}
        }
    }
    if r.mains.is_none() && supplies_listed {
        // Unplugged with a battery; a machine without one runs on mains.
        r.mains = Some(!battery_seen);
    }
    for e in std::fs::read_dir(sysfs.join("thermal")).into_iter().flatten().flatten() {
        if !e.file_name().to_string_lossy().starts_with("thermal_zone") {
            continue;
        }
        // Millidegrees; zones that report nonsense (negative, or past
        // 200 C, as some phones' unused sensors do) are left out.
        if let Ok(m) = read(&e.path().join("temp")).parse::<i64>()
            && (0..=200_000).contains(&m)
        {
            let c = m as f32 / 1000.0;
            r.celsius = Some(r.celsius.map_or(c, |h: f32| h.max(c)));
        }
    }
    r
}

/// Whether the worker takes tasks, and why not.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct State {
    /// Why it takes no task now; `None` while it works.
    pub paused: Option<String>,
    /// Paused for heat: it stays so until below `resume_below_celsius`.
    pub hot: bool,
}

impl PowerPolicy {
    /// The state after `reading`, from the state before (`was`).
    pub fn judge(&self, was: &State, r: &Reading) -> State {
        let hot = match r.celsius {
            Some(c) if self.pause_above_celsius > 0.0 => {
                c >= self.pause_above_celsius || (was.hot && c >= self.resume_below_celsius)
            }
            _ => false,
        };
        let on_battery = r.mains == Some(false);
        let paused = if hot {
            Some(format!(
                "too hot: {:.0} C (pauses above {:.0} C, works again below {:.0} C)",
                r.celsius.unwrap_or_default(),
                self.pause_above_celsius,
                self.resume_below_celsius
            ))
        } else if self.only_when_charging && on_battery {
            Some("on battery; this node takes tasks only while charging".into())
        } else if let Some(b) = r.battery_percent
            && on_battery
            && b < self.min_battery_percent
        {
            Some(format!(
                "battery at {b}%, below the {}% this node keeps",
                self.min_battery_percent
            ))
        } else {
            None
        };
        State { paused, hot }
    }

    /// Checks the settings: a resume temperature above the pause one would
    /// never resume.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.min_battery_percent > 100 {
            anyhow::bail!("power.min_battery_percent is {}, above 100", self.min_battery_percent);
        }
        if self.pause_above_celsius > 0.0 && self.resume_below_celsius > self.pause_above_celsius {
            anyhow::bail!(
                "power.resume_below_celsius ({}) is above power.pause_above_celsius ({})",
                self.resume_below_celsius,
                self.pause_above_celsius
            );
        }
        if self.check_secs == 0 {
            anyhow::bail!("power.check_secs must be at least 1");
        }
        Ok(())
    }

    /// What adverts say of this policy and state.
    pub fn availability(&self, r: &Reading, s: &State) -> protocol::Availability {
        protocol::Availability {
            battery_percent: r.battery_percent.unwrap_or(0),
            stops_below_battery_percent: self.min_battery_percent,
            only_while_charging: self.only_when_charging,
            paused: s.paused.clone().unwrap_or_default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake sysfs: a battery, a charger and two thermal zones.
    fn sysfs(dir: &Path, capacity: u32, status: &str, charger: bool, millis: i64) {
        let w = |p: &str, v: &str| {
            let p = dir.join(p);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, format!("{v}\n")).unwrap();
        };
        w("power_supply/battery/type", "Battery");
        w("power_supply/battery/capacity", &capacity.to_string());
        w("power_supply/battery/status", status);
        w("power_supply/usb/type", "USB");
        w("power_supply/usb/online", if charger { "1" } else { "0" });
        w("thermal/thermal_zone0/temp", &millis.to_string());
        w("thermal/thermal_zone1/temp", "-40000");
        w("thermal/cooling_device0/cur_state", "0");
    }

    fn tempdir(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("tern-power-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn sysfs_is_read_as_a_phone_reports_it() {
        let d = tempdir("read");
        sysfs(&d, 57, "Discharging", false, 41_500);
        let r = read(&d);
        assert_eq!(r.mains, Some(false));
        assert_eq!(r.power(), protocol::Power::Battery);
        assert_eq!(r.battery_percent, Some(57));
        assert_eq!(r.celsius, Some(41.5), "the bogus zone is left out");
        sysfs(&d, 57, "Charging", false, 30_000);
        assert_eq!(read(&d).mains, Some(true));
        sysfs(&d, 57, "Discharging", true, 30_000);
        assert_eq!(read(&d).mains, Some(true), "a charger online");
        assert_eq!(read(&d).power(), protocol::Power::Plugged);
        let desktop = tempdir("desktop");
        std::fs::create_dir_all(desktop.join("power_supply")).unwrap();
        assert_eq!(read(&desktop).power(), protocol::Power::Plugged, "no battery: on mains");
        let r = read(&tempdir("empty"));
        assert_eq!(r, Reading::default(), "no sysfs says nothing");
        assert_eq!(r.power(), protocol::Power::Unknown);
    }

    #[test]
    fn the_policy_pauses_below_the_battery_level_unplugged_and_hot_with_hysteresis() {
        let p = PowerPolicy {
            only_when_charging: false,
            min_battery_percent: 30,
            pause_above_celsius: 45.0,
            resume_below_celsius: 40.0,
            ..PowerPolicy::default()
        };
        p.validate().unwrap();
        let r = |mains, b, c| Reading {
            mains: Some(mains),
            battery_percent: Some(b),
            celsius: Some(c),
        };
        let ok = State::default();
        assert_eq!(p.judge(&ok, &r(false, 31, 30.0)), ok);
        let low = p.judge(&ok, &r(false, 29, 30.0));
        assert!(low.paused.as_deref().unwrap().contains("battery at 29%"), "{low:?}");
        assert_eq!(p.judge(&low, &r(true, 29, 30.0)), ok, "charging again");
        let hot = p.judge(&ok, &r(true, 90, 46.0));
        assert!(hot.hot && hot.paused.as_deref().unwrap().contains("too hot"));
        assert!(p.judge(&hot, &r(true, 90, 42.0)).hot, "still above the resume level");
        assert_eq!(p.judge(&hot, &r(true, 90, 39.0)), ok, "cooled down");
        assert_eq!(p.judge(&ok, &r(true, 90, 42.0)), ok, "never hot: 42 C is fine");
        let unplugged = PowerPolicy {
            only_when_charging: true,
            ..p.clone()
        };
        assert!(unplugged.judge(&ok, &r(false, 90, 30.0)).paused.is_some());
        assert_eq!(unplugged.judge(&ok, &r(true, 90, 30.0)), ok);
        let bad = PowerPolicy {
            resume_below_celsius: 50.0,
            ..p
        };
        assert!(bad.validate().is_err());
    }
}
